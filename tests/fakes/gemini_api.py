"""A fake Gemini API: `models/{m}`, `:generateContent` and `:streamGenerateContent?alt=sse`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.fakes._server import FakeProvider, Reply

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from starlette.requests import Request

__all__ = ["FakeGemini"]

_TYPE = "type.googleapis.com/google.rpc."


def _error(
    status: int, code: str, message: str, details: list[dict[str, Any]] | None = None
) -> Response:
    error: dict[str, Any] = {"code": status, "message": message, "status": code}
    if details:
        error["details"] = details
    return JSONResponse({"error": error}, status_code=status)


@dataclass
class FakeGemini(FakeProvider):
    """The Gemini API as served under `/v1` and `/v1beta`, keyed by `x-goog-api-key`."""

    def app(self) -> Starlette:
        return Starlette(
            routes=[Route("/{version}/models/{rest:path}", self._models, methods=["GET", "POST"])]
        )

    def _unauthorized(self, request: Request) -> Response | None:
        key = request.headers.get("x-goog-api-key") or request.query_params.get("key")
        if self.api_key is None or key == self.api_key:
            return None
        # Gemini answers a bad key with 400 INVALID_ARGUMENT and the reason in the details.
        info = {
            "@type": _TYPE + "ErrorInfo",
            "reason": "API_KEY_INVALID",
            "domain": "googleapis.com",
        }
        return _error(
            400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key.", [info]
        )

    def _unknown(self, model: str, version: str) -> Response:
        message = f"models/{model} is not found for API version {version}, or is not supported."
        return _error(404, "NOT_FOUND", message)

    async def _models(self, request: Request) -> Response:
        version = request.path_params["version"]
        model, _, method = request.path_params["rest"].partition(":")
        if request.method == "GET":
            refused = self._unauthorized(request)
            if refused is not None:
                return refused
            if model not in self.models:
                return self._unknown(model, version)
            return JSONResponse({"name": f"models/{model}", "displayName": model, "version": "001"})
        body = await request.json()
        prompt = str(body["contents"][-1]["parts"][0]["text"])
        stream = method == "streamGenerateContent"
        self.record(request.url.path, model, prompt, stream, body, request.headers)
        refused = self._unauthorized(request)
        if refused is not None:
            return refused
        if model not in self.models:
            return self._unknown(model, version)
        reply = self.next_reply(prompt)
        failure = await self._failure(reply)
        if failure is not None:
            return failure
        if stream:
            if request.query_params.get("alt") != "sse":
                return _error(400, "INVALID_ARGUMENT", "this fake streams only with alt=sse")
            return StreamingResponse(
                self._events(model, prompt, reply), media_type="text/event-stream"
            )
        return JSONResponse(self._response(model, prompt, reply))

    async def _failure(self, reply: Reply) -> Response | None:
        if reply.kind == "hang":
            await self.wait_closing()
            return _error(503, "UNAVAILABLE", "shutting down")
        if reply.kind == "rate_limited":
            details = [{"@type": _TYPE + "QuotaFailure", "violations": [{"quotaId": "PerMinute"}]}]
            if reply.retry_after_s is not None:
                details.append(
                    {"@type": _TYPE + "RetryInfo", "retryDelay": f"{reply.retry_after_s:g}s"}
                )
            return _error(429, "RESOURCE_EXHAUSTED", "You exceeded your current quota.", details)
        if reply.kind == "server_error":
            return _error(reply.status, "INTERNAL", "An internal error has occurred.")
        if reply.kind == "bad_request":
            return _error(400, "INVALID_ARGUMENT", "The input token count exceeds the maximum.")
        return None

    def _usage(self, prompt: str, text: str) -> dict[str, int]:
        prompt_tokens = len(prompt.split()) + 3
        completion_tokens = len(text.split())
        return {
            "promptTokenCount": prompt_tokens,
            "candidatesTokenCount": completion_tokens,
            "totalTokenCount": prompt_tokens + completion_tokens,
        }

    def _response(self, model: str, prompt: str, reply: Reply) -> dict[str, Any]:
        if reply.kind == "blocked":
            feedback = {
                "blockReason": "SAFETY",
                "safetyRatings": [
                    {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH"}
                ],
            }
            return {
                "promptFeedback": feedback,
                "usageMetadata": self._usage(prompt, ""),
                "modelVersion": model,
            }
        if reply.kind == "empty":
            return {
                "candidates": [],
                "usageMetadata": self._usage(prompt, ""),
                "modelVersion": model,
            }
        text = self.answer(prompt, reply)
        return {
            "candidates": [self._candidate(text, "STOP")],
            "usageMetadata": self._usage(prompt, text),
            "modelVersion": model,
            "responseId": "fake-response",
        }

    @staticmethod
    def _candidate(text: str, finish: str | None) -> dict[str, Any]:
        candidate: dict[str, Any] = {
            "content": {"parts": [{"text": text}], "role": "model"},
            "index": 0,
        }
        if finish:
            candidate["finishReason"] = finish
        return candidate

    async def _events(self, model: str, prompt: str, reply: Reply) -> AsyncIterator[str]:
        if reply.kind in ("blocked", "empty"):
            yield f"data: {json.dumps(self._response(model, prompt, reply))}\r\n\r\n"
            return
        text = self.answer(prompt, reply)
        pieces = list(self.pieces(text))
        for index, piece in enumerate(pieces):
            last = index == len(pieces) - 1
            chunk: dict[str, Any] = {
                "candidates": [self._candidate(piece, "STOP" if last else None)],
                "modelVersion": model,
            }
            if last:
                chunk["usageMetadata"] = self._usage(prompt, text)
            yield f"data: {json.dumps(chunk)}\r\n\r\n"
