"""A fake Ollama: `/api/tags`, `/api/pull`, `/api/chat` and `/api/generate`, streaming
line-delimited JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.fakes._server import FakeProvider, Reply

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from starlette.requests import Request

__all__ = ["FakeOllama"]

# Durations Ollama reports, in nanoseconds, for a small model on a Pi-class machine.
LOAD_NS = 5_000_000
PROMPT_EVAL_NS = 20_000_000
NS_PER_TOKEN = 50_000_000  # 20 tokens/s
PULL_LAYER_BYTES = 4_000_000
PULL_STEPS = 4


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _error(status: int, message: str) -> Response:
    return JSONResponse({"error": message}, status_code=status)


@dataclass
class FakeOllama(FakeProvider):
    """Ollama's HTTP API; no key by default (a proxy in front of Ollama may ask for one)."""

    api_key: str | None = None
    #: Models `/api/pull` can fetch (and then lists).
    registry: set[str] = field(default_factory=set)

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/api/tags", self._tags, methods=["GET"]),
                Route("/api/pull", self._pull, methods=["POST"]),
                Route("/api/chat", self._chat, methods=["POST"]),
                Route("/api/generate", self._generate, methods=["POST"]),
            ]
        )

    def _unauthorized(self, request: Request) -> Response | None:
        if self.api_key is None or request.headers.get("authorization") == f"Bearer {self.api_key}":
            return None
        return _error(401, "unauthorized")

    async def _tags(self, request: Request) -> Response:
        refused = self._unauthorized(request)
        if refused is not None:
            return refused
        models = [
            {
                "name": name,
                "model": name,
                "modified_at": _now(),
                "size": PULL_LAYER_BYTES,
                "digest": "0" * 64,
                "details": {"format": "gguf", "family": "llama", "parameter_size": "1B"},
            }
            for name in sorted(self.models)
        ]
        return JSONResponse({"models": models})

    async def _pull(self, request: Request) -> Response:
        body = await request.json()
        model = str(body.get("model") or body.get("name"))
        self.record(request.url.path, model, "", True, body, request.headers)
        if model not in self.registry:
            return _error(500, "pull model manifest: file does not exist")

        async def progress() -> AsyncIterator[str]:
            yield json.dumps({"status": "pulling manifest"}) + "\n"
            for step in range(1, PULL_STEPS + 1):
                completed = PULL_LAYER_BYTES * step // PULL_STEPS
                line = {
                    "status": "pulling 0123abcd",
                    "digest": "sha256:0123abcd",
                    "total": PULL_LAYER_BYTES,
                    "completed": completed,
                }
                yield json.dumps(line) + "\n"
            self.models.add(model)
            yield json.dumps({"status": "success"}) + "\n"

        return StreamingResponse(progress(), media_type="application/x-ndjson")

    async def _chat(self, request: Request) -> Response:
        body = await request.json()
        return await self._answer(request, body, str(body["messages"][-1]["content"]), "chat")

    async def _generate(self, request: Request) -> Response:
        body = await request.json()
        return await self._answer(request, body, str(body["prompt"]), "generate")

    async def _answer(
        self, request: Request, body: dict[str, Any], prompt: str, api: str
    ) -> Response:
        model = str(body.get("model", ""))
        # Ollama streams unless told not to.
        stream = body.get("stream", True) is not False
        self.record(request.url.path, model, prompt, stream, body, request.headers)
        refused = self._unauthorized(request)
        if refused is not None:
            return refused
        if model not in self.models:
            return _error(404, f"model '{model}' not found, try pulling it first")
        reply = self.next_reply(prompt)
        failure = await self._failure(reply)
        if failure is not None:
            return failure
        if stream:
            return StreamingResponse(
                self._lines(model, prompt, reply, api), media_type="application/x-ndjson"
            )
        text = "" if reply.kind in ("blocked", "empty") else self.answer(prompt, reply)
        return JSONResponse(self._final(model, prompt, text, text, api))

    async def _failure(self, reply: Reply) -> Response | None:
        if reply.kind == "hang":
            await self.wait_closing()
            return _error(503, "shutting down")
        if reply.kind == "rate_limited":
            # Ollama itself never sends retry-after; a proxy in front of it may.
            response = _error(429, "too many requests")
            if reply.retry_after_s is not None:
                response.headers["retry-after"] = f"{reply.retry_after_s:g}"
            return response
        if reply.kind == "server_error":
            return _error(reply.status, "llama runner process has terminated: signal: killed")
        if reply.kind == "bad_request":
            return _error(400, "invalid options: num_ctx must be positive")
        return None

    @staticmethod
    def _output(api: str, content: str) -> dict[str, Any]:
        """Where each API puts output: chat in a message, generate in `response`."""
        if api == "chat":
            return {"message": {"role": "assistant", "content": content}}
        return {"response": content}

    def _final(self, model: str, prompt: str, content: str, text: str, api: str) -> dict[str, Any]:
        prompt_tokens = len(prompt.split()) + 3
        completion_tokens = len(text.split())
        eval_ns = completion_tokens * NS_PER_TOKEN
        return {
            "model": model,
            "created_at": _now(),
            **self._output(api, content),
            "done": True,
            "done_reason": "stop",
            "total_duration": LOAD_NS + PROMPT_EVAL_NS + eval_ns,
            "load_duration": LOAD_NS,
            "prompt_eval_count": prompt_tokens,
            "prompt_eval_duration": PROMPT_EVAL_NS,
            "eval_count": completion_tokens,
            "eval_duration": eval_ns,
        }

    async def _lines(self, model: str, prompt: str, reply: Reply, api: str) -> AsyncIterator[str]:
        text = "" if reply.kind in ("blocked", "empty") else self.answer(prompt, reply)
        for piece in self.pieces(text) if text else ():
            part = {"model": model, "created_at": _now(), **self._output(api, piece), "done": False}
            yield json.dumps(part) + "\n"
        yield json.dumps(self._final(model, prompt, "", text, api)) + "\n"
