"""A fake OpenAI-compatible server: `/v1/models` and `/v1/chat/completions`, with SSE streaming."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.fakes._server import FakeProvider, Reply

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from starlette.requests import Request

__all__ = ["FakeOpenAI"]


def _error(status: int, message: str, kind: str, code: str | None, headers: Any = None) -> Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


@dataclass
class FakeOpenAI(FakeProvider):
    """The chat-completions protocol as OpenAI serves it under `/v1`."""

    prefix: str = "/v1"

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route(f"{self.prefix}/models", self._models, methods=["GET"]),
                Route(f"{self.prefix}/chat/completions", self._chat, methods=["POST"]),
            ]
        )

    def _unauthorized(self, request: Request) -> Response | None:
        if self.api_key is None or request.headers.get("authorization") == f"Bearer {self.api_key}":
            return None
        return _error(401, "Invalid API Key", "invalid_request_error", "invalid_api_key")

    async def _models(self, request: Request) -> Response:
        refused = self._unauthorized(request)
        if refused is not None:
            return refused
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in self.models]
        return JSONResponse({"object": "list", "data": sorted(data, key=lambda m: m["id"])})

    async def _chat(self, request: Request) -> Response:
        body = await request.json()
        model = str(body.get("model", ""))
        prompt = str(body["messages"][-1]["content"])
        stream = bool(body.get("stream"))
        self.record(request.url.path, model, prompt, stream, body, request.headers)
        refused = self._unauthorized(request)
        if refused is not None:
            return refused
        if model not in self.models:
            message = f"The model `{model}` does not exist or you do not have access to it."
            return _error(404, message, "invalid_request_error", "model_not_found")
        reply = self.next_reply(prompt)
        failure = await self._failure(reply)
        if failure is not None:
            return failure
        if stream:
            events = self._events(model, prompt, reply, body)
            return StreamingResponse(events, media_type="text/event-stream")
        return JSONResponse(self._completion(model, prompt, reply))

    async def _failure(self, reply: Reply) -> Response | None:
        if reply.kind == "hang":
            await self.wait_closing()
            return _error(503, "shutting down", "server_error", None)
        if reply.kind == "rate_limited":
            headers = {"x-ratelimit-remaining-requests": "0"}
            if reply.retry_after_s is not None:
                headers["retry-after"] = f"{reply.retry_after_s:g}"
            message = "Rate limit reached for requests per minute (RPM): Limit 30."
            return _error(429, message, "requests", "rate_limit_exceeded", headers)
        if reply.kind == "no_quota":
            message = "You exceeded your current quota, please check your plan and billing details."
            return _error(429, message, "insufficient_quota", "insufficient_quota")
        if reply.kind == "server_error":
            return _error(reply.status, "Internal server error", "internal_server_error", None)
        if reply.kind == "bad_request":
            message = "This model's maximum context length is 8192 tokens."
            return _error(400, message, "invalid_request_error", "context_length_exceeded")
        return None

    def _usage(self, prompt: str, text: str) -> dict[str, Any]:
        prompt_tokens = len(prompt.split()) + 3
        completion_tokens = len(text.split())
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    def _completion(self, model: str, prompt: str, reply: Reply) -> dict[str, Any]:
        text = "" if reply.kind in ("blocked", "empty") else self.answer(prompt, reply)
        choices: list[dict[str, Any]] = []
        if reply.kind != "empty":
            choices.append(
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text or None},
                    "logprobs": None,
                    "finish_reason": "content_filter" if reply.kind == "blocked" else "stop",
                }
            )
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": choices,
            "usage": self._usage(prompt, text),
        }

    def _chunk(self, model: str, choices: list[dict[str, Any]], **extra: Any) -> str:
        chunk = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "choices": choices,
            **extra,
        }
        return f"data: {json.dumps(chunk)}\n\n"

    def _final_usage(self, model: str, usage: dict[str, Any], body: dict[str, Any]) -> list[str]:
        """The usage chunk OpenAI sends after the last choice when asked for it."""
        if (body.get("stream_options") or {}).get("include_usage"):
            return [self._chunk(model, [], usage=usage)]
        return []

    async def _events(
        self, model: str, prompt: str, reply: Reply, body: dict[str, Any]
    ) -> AsyncIterator[str]:
        text = "" if reply.kind in ("blocked", "empty") else self.answer(prompt, reply)
        if reply.kind != "empty":
            role = {
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "finish_reason": None,
            }
            yield self._chunk(model, [role])
            for piece in self.pieces(text) if text else ():
                delta = {"index": 0, "delta": {"content": piece}, "finish_reason": None}
                yield self._chunk(model, [delta])
            finish = "content_filter" if reply.kind == "blocked" else "stop"
            yield self._chunk(model, [{"index": 0, "delta": {}, "finish_reason": finish}])
        for event in self._final_usage(model, self._usage(prompt, text), body):
            yield event
        yield "data: [DONE]\n\n"
