"""Google Gemini through `google-genai` (the maintained SDK), with an explicit timeout.

The SDK makes one attempt per call unless told otherwise, and it has no timeout of its own,
so the worker gives it one. It is held to httpx: where aiohttp is installed the SDK would
switch to it, and then silently retry a dropped connection once.
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import TYPE_CHECKING, Any, Self

from mesh.errors import ConfigError, TransientError

try:
    import httpx
    import httpx2
    from google import genai
    from google.genai import errors as genai_errors
    from google.genai import types as genai_types
except ImportError:
    raise ConfigError(
        "the gemini backend needs the google-genai package: pip install 'd8-mesh[cloud]'"
    ) from None

from mesh.connection import redact_url
from mesh.contract import Usage
from workers.backends import BackendSettings, Generation, OnPiece
from workers.backends._errors import (
    ContentBlockedError,
    EmptyAnswerError,
    error_for_status,
    redact,
    retry_after_s,
)
from workers.ratelimit import RequestLimiter

if TYPE_CHECKING:
    from types import TracebackType

    from mesh.contract import Task
    from mesh.errors import MeshError

__all__ = ["GeminiBackend", "gemini_key"]

logger = logging.getLogger(__name__)

KEY_VARIABLES = ("GOOGLE_API_KEY", "GEMINI_API_KEY")
BASE_URL_VARIABLE = "GOOGLE_GEMINI_BASE_URL"
CHECK_TIMEOUT_S = 15.0
# Finish reasons that mean the answer was withheld rather than finished.
_BLOCKING_FINISH = {
    "SAFETY",
    "RECITATION",
    "BLOCKLIST",
    "PROHIBITED_CONTENT",
    "SPII",
    "IMAGE_SAFETY",
}
_RETRY_DELAY = re.compile(r"^\s*([0-9.]+)s\s*$")
_TRANSPORT_ERRORS = (httpx2.TransportError, httpx.TransportError, ConnectionError, TimeoutError)


def gemini_key() -> str | None:
    """The API key from `GOOGLE_API_KEY` or `GEMINI_API_KEY`; the first wins, as in the SDK."""
    return next((os.environ[v] for v in KEY_VARIABLES if os.environ.get(v)), None)


class GeminiBackend:
    """Chat with a Gemini model; several calls at once by default."""

    name = "gemini"
    default_concurrency = 4
    costly = True

    def __init__(self, settings: BackendSettings) -> None:
        if not settings.models:
            raise ConfigError(
                "the gemini backend needs a model: pass --model, e.g. gemini-2.5-flash"
            )
        key = gemini_key()
        if key is None:
            raise ConfigError(
                "the gemini backend needs an API key: set GEMINI_API_KEY or GOOGLE_API_KEY"
            )
        self.models = settings.models
        self._key = key
        self.base_url = settings.base_url or os.environ.get(BASE_URL_VARIABLE) or None
        self._limiter = RequestLimiter(settings.rpm) if settings.rpm else None
        self._timeout_ms = int(settings.timeout_s * 1000)
        # A transport of our own keeps the SDK on httpx even where aiohttp is installed: its
        # aiohttp path retries a dropped connection once by itself (a second paid call) and
        # raises errors the worker would not translate.
        options = genai_types.HttpOptions(
            base_url=self.base_url,
            timeout=self._timeout_ms,
            async_client_args={"transport": httpx.AsyncHTTPTransport()},
        )
        # Kept for the backend's lifetime: the client closes its transport when collected.
        self._client = genai.Client(api_key=key, http_options=options)

    @property
    def where(self) -> str:
        shown = redact_url(self.base_url) if self.base_url else "its default address"
        return f"Gemini at {shown}"

    async def __aenter__(self) -> Self:
        checked = False
        try:
            await self._check_start_up()
            checked = True
        finally:
            if not checked:
                # Close the connections the failed check opened.
                await self._client.aio.aclose()
        return self

    async def _check_start_up(self) -> None:
        """Check once, with a free call per model, that the key works and the model exists."""
        check = genai_types.GetModelConfig(
            http_options=genai_types.HttpOptions(timeout=int(CHECK_TIMEOUT_S * 1000))
        )
        for model in self.models:
            try:
                await self._client.aio.models.get(model=model, config=check)
            except genai_errors.APIError as exc:
                error = self._translate(exc, model)
                raise ConfigError(f"start-up check failed: {error}") from None
            except _TRANSPORT_ERRORS as exc:
                raise ConfigError(
                    f"cannot reach {self.where} ({type(exc).__name__}): check the network, "
                    f"{BASE_URL_VARIABLE} or --base-url"
                ) from None

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self._client.aio.aclose()

    async def generate(self, task: Task, model: str, on_piece: OnPiece | None) -> Generation:
        contents, config = _request(task)
        if self._limiter is not None:
            await self._limiter.acquire()
        started = time.perf_counter()
        try:
            if on_piece is None:
                response = await self._client.aio.models.generate_content(
                    model=model, contents=contents, config=config
                )
                text = _answer_text(response, model)
                return Generation(text=text, model=model, usage=_usage(response, started, None, 0))
            return await self._stream(model, contents, config, on_piece, started)
        except genai_errors.APIError as exc:
            raise self._translate(exc, model) from exc
        except _TRANSPORT_ERRORS as exc:
            # The SDK passes timeouts and dropped connections through unwrapped.
            raise TransientError(f"{self.where}: {type(exc).__name__}") from exc

    async def _stream(
        self,
        model: str,
        contents: list[genai_types.Content],
        config: genai_types.GenerateContentConfig,
        on_piece: OnPiece,
        started: float,
    ) -> Generation:
        pieces: list[str] = []
        first_piece_at: float | None = None
        last: Any = None
        stream = await self._client.aio.models.generate_content_stream(
            model=model, contents=contents, config=config
        )
        async for chunk in stream:
            last = chunk if chunk.usage_metadata is not None or last is None else last
            _raise_if_blocked(chunk, model, has_text=bool(pieces))
            piece = chunk.text if chunk.candidates else None
            if piece:
                if first_piece_at is None:
                    first_piece_at = time.perf_counter()
                pieces.append(piece)
                await on_piece(piece)
        if last is None:
            raise EmptyAnswerError(f"{model} sent an empty stream")
        if not pieces:
            _answer_text(last, model)
        return Generation(
            text="".join(pieces),
            model=model,
            usage=_usage(last, started, first_piece_at, len(pieces)),
        )

    def _translate(self, exc: genai_errors.APIError, model: str) -> MeshError:
        detail = redact(exc.message or str(exc.status or ""), self._key)
        status = int(exc.code or 0)
        if status == 400 and _reason(exc.details) in ("API_KEY_INVALID", "API_KEY_EXPIRED"):
            # Gemini answers a bad key with 400 INVALID_ARGUMENT, not 401.
            status = 401
        delay_s = _retry_delay_s(exc) if status == 429 else None
        return error_for_status(status, detail, provider=self.where, model=model, delay_s=delay_s)


def _request(task: Task) -> tuple[list[genai_types.Content], genai_types.GenerateContentConfig]:
    system = [m.content for m in task.chat_messages() if m.role == "system"]
    contents = [
        genai_types.Content(
            role="model" if m.role == "assistant" else "user",
            parts=[genai_types.Part(text=m.content)],
        )
        for m in task.chat_messages()
        if m.role != "system"
    ]
    options = task.options
    config = genai_types.GenerateContentConfig(
        system_instruction="\n\n".join(system) or None,
        temperature=options.temperature,
        max_output_tokens=options.max_tokens,
        stop_sequences=options.stop,
        seed=options.seed,
    )
    return contents, config


def _raise_if_blocked(response: Any, model: str, *, has_text: bool) -> None:
    feedback = response.prompt_feedback
    if feedback is not None and feedback.block_reason is not None:
        reason = _enum_name(feedback.block_reason)
        message = f": {feedback.block_reason_message}" if feedback.block_reason_message else ""
        raise ContentBlockedError(f"{model} blocked the prompt: {reason}{message}")
    for candidate in response.candidates or []:
        finish = _enum_name(candidate.finish_reason) if candidate.finish_reason else None
        if finish in _BLOCKING_FINISH and not has_text and not _candidate_text(candidate):
            raise ContentBlockedError(f"{model} withheld its answer: finish_reason={finish}")


def _answer_text(response: Any, model: str) -> str:
    _raise_if_blocked(response, model, has_text=False)
    if not response.candidates:
        raise EmptyAnswerError(f"{model} answered with no candidates")
    return _candidate_text(response.candidates[0])


def _candidate_text(candidate: Any) -> str:
    content = candidate.content
    parts = (content.parts if content is not None else None) or []
    return "".join(part.text for part in parts if part.text and not part.thought)


def _enum_name(value: Any) -> str:
    return str(getattr(value, "value", value))


def _usage(response: Any, started: float, first_piece_at: float | None, pieces: int) -> Usage:
    metadata = response.usage_metadata
    prompt_tokens = int(getattr(metadata, "prompt_token_count", 0) or 0)
    completion_tokens = int(getattr(metadata, "candidates_token_count", 0) or 0) or pieces
    elapsed_s = time.perf_counter() - (first_piece_at or started)
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        ttft_ms=round((first_piece_at - started) * 1000, 3) if first_piece_at else None,
        tokens_per_s=round(completion_tokens / elapsed_s, 2) if elapsed_s > 0 else None,
    )


def _reason(details: Any) -> str | None:
    """The `ErrorInfo.reason` of a Google API error body, e.g. `API_KEY_INVALID`."""
    for item in _detail_items(details):
        if isinstance(item.get("reason"), str):
            return str(item["reason"])
    return None


def _retry_delay_s(exc: genai_errors.APIError) -> float | None:
    """The wait a 429 asks for: the `RetryInfo` detail (`"17s"`), else a retry-after header."""
    for item in _detail_items(exc.details):
        match = _RETRY_DELAY.match(str(item.get("retryDelay", "")))
        if match:
            return float(match.group(1))
    response = getattr(exc, "response", None)
    return retry_after_s(getattr(response, "headers", None))


def _detail_items(details: Any) -> list[dict[str, Any]]:
    error = details.get("error", details) if isinstance(details, dict) else None
    items = error.get("details") if isinstance(error, dict) else None
    return [item for item in items or [] if isinstance(item, dict)]
