"""The shared body of backends that speak OpenAI's chat-completions protocol (groq, openai).

Both SDKs come from the same generator, so their clients, streams and exception classes
have the same shape; a `Flavour` names what differs. Their own retries are switched off
(`max_retries=0`): one attempt of a task is one HTTP call, and the mesh decides on retries.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self

from mesh.connection import redact_url
from mesh.contract import Usage
from mesh.errors import ConfigError, TransientError
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
    from collections.abc import Callable
    from types import ModuleType, TracebackType

    from mesh.contract import Task
    from mesh.errors import MeshError

__all__ = ["ChatCompletionsBackend", "Flavour"]

logger = logging.getLogger(__name__)

# A cloud API accepts a connection within seconds or not at all.
CONNECT_TIMEOUT_S = 10.0
# Timeout of the start-up check (list models): a small, free call.
CHECK_TIMEOUT_S = 15.0
# An OpenAI quota error is a 429 that no waiting fixes: the account needs credit.
_NO_QUOTA_CODES = {"insufficient_quota", "billing_not_active"}


@dataclass(frozen=True, slots=True)
class Flavour:
    """What one chat-completions provider does its own way."""

    name: str
    provider: str
    sdk: ModuleType
    #: The HTTP library under the SDK (httpx for groq, httpx2 for openai).
    http: ModuleType
    client_class: Callable[..., Any]
    key_variables: tuple[str, ...]
    base_url_variable: str
    example_model: str
    #: Whether the model list is authoritative (a model missing from it cannot be served).
    strict_models: bool
    #: Streaming keywords that make the provider send token usage at the end of a stream.
    stream_usage: dict[str, Any]


class ChatCompletionsBackend:
    """Chat through an OpenAI-style API; several calls at once by default."""

    name = "chat-completions"
    default_concurrency = 4
    costly = True
    flavour: Flavour

    def __init__(self, settings: BackendSettings) -> None:
        flavour = self.flavour
        if not settings.models:
            raise ConfigError(
                f"the {flavour.name} backend needs a model: pass --model, "
                f"e.g. {flavour.example_model}"
            )
        key = next((os.environ[v] for v in flavour.key_variables if os.environ.get(v)), None)
        if key is None:
            names = " or ".join(flavour.key_variables)
            raise ConfigError(f"the {flavour.name} backend needs an API key: set {names}")
        self.models = settings.models
        self._key = key
        self.base_url = settings.base_url or os.environ.get(flavour.base_url_variable) or None
        self._limiter = RequestLimiter(settings.rpm) if settings.rpm else None
        self._client = flavour.client_class(
            api_key=key,
            base_url=self.base_url,
            max_retries=0,
            timeout=flavour.http.Timeout(settings.timeout_s, connect=CONNECT_TIMEOUT_S),
        )

    @property
    def where(self) -> str:
        shown = redact_url(self.base_url) if self.base_url else "its default address"
        return f"{self.flavour.provider} at {shown}"

    async def __aenter__(self) -> Self:
        checked = False
        try:
            await self._check_start_up()
            checked = True
        finally:
            if not checked:
                # Close the connections the failed check opened.
                await self._client.close()
        return self

    async def _check_start_up(self) -> None:
        """Check once, with a free call, that the key works and the models exist."""
        sdk = self.flavour.sdk
        try:
            listed = await self._client.models.list(timeout=CHECK_TIMEOUT_S)
        except sdk.APIStatusError as exc:
            detail = redact(_message(exc), self._key)
            raise ConfigError(
                f"{self.where} refused the model list ({exc.status_code}): {detail}; "
                f"check {' or '.join(self.flavour.key_variables)}"
            ) from None
        except (sdk.APIConnectionError, self.flavour.http.TransportError) as exc:
            raise ConfigError(
                f"cannot reach {self.where} ({type(exc).__name__}): check the network, "
                f"{self.flavour.base_url_variable} or --base-url"
            ) from None
        known = {model.id for model in listed.data}
        missing = [m for m in self.models if m not in known]
        if missing and self.flavour.strict_models:
            raise ConfigError(
                f"{self.where} does not serve {', '.join(missing)}: pick one of "
                f"{', '.join(sorted(known)[:20]) or 'none listed'}"
            )
        if missing:
            logger.warning("model not listed by server, trying anyway models=%s", ",".join(missing))

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self._client.close()

    async def generate(self, task: Task, model: str, on_piece: OnPiece | None) -> Generation:
        sdk = self.flavour.sdk
        request = _request(task, model)
        if self._limiter is not None:
            await self._limiter.acquire()
        started = time.perf_counter()
        try:
            if on_piece is None:
                response = await self._client.chat.completions.create(**request)
                return _generation(model, response, started, None)
            return await self._stream(model, request, on_piece, started)
        except sdk.APIStatusError as exc:
            raise self._translate(exc, model) from exc
        except sdk.APIConnectionError as exc:
            # APITimeoutError is a subclass: a hang or a dropped connection, both may pass.
            raise TransientError(f"{self.where}: {type(exc).__name__}") from exc
        except sdk.APIError as exc:
            # An error event inside a stream carries no status.
            detail = redact(_message(exc), self._key)
            raise TransientError(f"{self.where} failed mid-stream: {detail}") from exc
        except (self.flavour.http.TransportError, ConnectionError) as exc:
            # groq lets a stream cut mid-way through unwrapped.
            raise TransientError(f"{self.where}: {type(exc).__name__} while streaming") from exc

    async def _stream(
        self, model: str, request: dict[str, Any], on_piece: OnPiece, started: float
    ) -> Generation:
        pieces: list[str] = []
        first_piece_at: float | None = None
        usage: Any = None
        finish_reason: str | None = None
        saw_choice = False
        # LIMITATION: a server too old to know `stream_options` answers 400, and streaming
        # tasks then end as invalid; llama.cpp, vLLM and LM Studio accept it.
        stream = await self._client.chat.completions.create(
            **request, stream=True, **self.flavour.stream_usage
        )
        async with stream:
            async for chunk in stream:
                usage = _chunk_usage(chunk) or usage
                if not chunk.choices:
                    continue
                saw_choice = True
                choice = chunk.choices[0]
                finish_reason = choice.finish_reason or finish_reason
                piece = choice.delta.content if choice.delta else None
                if piece:
                    if first_piece_at is None:
                        first_piece_at = time.perf_counter()
                    pieces.append(piece)
                    await on_piece(piece)
        text = "".join(pieces)
        _check_answer(saw_choice, finish_reason, text, model)
        return Generation(
            text=text, model=model, usage=_usage(usage, started, first_piece_at, len(pieces))
        )

    def _translate(self, exc: Any, model: str) -> MeshError:
        detail = redact(_message(exc), self._key)
        code = _error_code(exc)
        if exc.status_code == 429 and code in _NO_QUOTA_CODES:
            return error_for_status(403, detail, provider=self.where, model=model)
        return error_for_status(
            exc.status_code,
            detail,
            provider=self.where,
            model=model,
            delay_s=retry_after_s(exc.response.headers),
        )


def _request(task: Task, model: str) -> dict[str, Any]:
    options = task.options
    request: dict[str, Any] = {
        "model": model,
        "messages": [{"role": m.role, "content": m.content} for m in task.chat_messages()],
    }
    optional = {
        "temperature": options.temperature,
        "max_tokens": options.max_tokens,
        "stop": options.stop,
        "seed": options.seed,
    }
    request.update({key: value for key, value in optional.items() if value is not None})
    return request


def _message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return str(inner["message"])
    return str(getattr(exc, "message", "") or exc)


def _error_code(exc: Any) -> str | None:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            code = inner.get("code") or inner.get("type")
            return str(code) if code else None
    return None


def _check_answer(saw_choice: bool, finish_reason: str | None, text: str, model: str) -> None:
    if not saw_choice:
        raise EmptyAnswerError(f"{model} answered with no choices")
    if finish_reason == "content_filter" and not text:
        raise ContentBlockedError(f"{model} withheld its answer: finish_reason=content_filter")


def _chunk_usage(chunk: Any) -> Any:
    usage = getattr(chunk, "usage", None)
    if usage is not None:
        return usage
    x_groq = getattr(chunk, "x_groq", None)
    return getattr(x_groq, "usage", None)


def _generation(
    model: str, response: Any, started: float, first_piece_at: float | None
) -> Generation:
    choices = response.choices or []
    choice = choices[0] if choices else None
    text = (choice.message.content or "") if choice is not None else ""
    _check_answer(choice is not None, choice.finish_reason if choice else None, text, model)
    return Generation(
        text=text, model=model, usage=_usage(response.usage, started, first_piece_at, 0)
    )


def _usage(usage: Any, started: float, first_piece_at: float | None, pieces: int) -> Usage:
    """Usage as reported; timings from the provider when it gives them (groq), else measured."""
    finished = time.perf_counter()
    prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
    completion_tokens = int(getattr(usage, "completion_tokens", 0) or 0) or pieces
    completion_time_s = getattr(usage, "completion_time", None)
    ttft_ms: float | None = None
    if first_piece_at is not None:
        ttft_ms = round((first_piece_at - started) * 1000, 3)
    elif getattr(usage, "prompt_time", None) is not None:
        ttft_ms = round(((usage.queue_time or 0.0) + usage.prompt_time) * 1000, 3)
    if not completion_time_s:
        completion_time_s = finished - (first_piece_at or started)
    tokens_per_s = (
        round(completion_tokens / completion_time_s, 2) if completion_time_s > 0 else None
    )
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        ttft_ms=ttft_ms,
        tokens_per_s=tokens_per_s,
    )
