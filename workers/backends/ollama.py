"""Ollama, through the `ollama` library's async client: the Pi's local model."""

from __future__ import annotations

import contextvars
import logging
import os
import time
from typing import TYPE_CHECKING, Any, Self

import httpx
import ollama

from mesh.connection import redact_url
from mesh.contract import Usage
from mesh.errors import ConfigError, TransientError
from workers.backends import BackendSettings, Generation, OnPiece
from workers.backends._errors import error_for_status, redact, retry_after_s

if TYPE_CHECKING:
    from types import TracebackType

    from mesh.contract import Task
    from mesh.errors import MeshError

__all__ = ["OllamaBackend", "ollama_host"]

logger = logging.getLogger(__name__)

DEFAULT_HOST = "http://127.0.0.1:11434"
# Keep the model loaded between tasks: reloading a 6.7B model from an SD card takes minutes.
# `D8_OLLAMA_KEEP_ALIVE` takes Ollama's own forms: "30m", "2h", "-1" (forever), "0" (unload).
DEFAULT_KEEP_ALIVE = "30m"
KEEP_ALIVE_VARIABLE = "D8_OLLAMA_KEEP_ALIVE"
# Connecting is quick or never; a generation on a Pi takes minutes.
CONNECT_TIMEOUT_S = 10.0
# How often a pull logs its progress; a 4 GB model takes many minutes on a Pi.
PULL_LOG_INTERVAL_S = 5.0

# The retry-after of the last 429 seen by this task's calls: Ollama sends none, but a proxy
# in front of it may, and `ollama.ResponseError` does not carry the response's headers.
_last_retry_after_s: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "ollama_retry_after_s", default=None
)


async def _note_retry_after(response: httpx.Response) -> None:
    if response.status_code == 429:
        _last_retry_after_s.set(retry_after_s(response.headers))


def ollama_host(base_url: str | None = None) -> str:
    """The Ollama address: the setting, else `OLLAMA_HOST`, else the local default."""
    host = base_url or os.environ.get("OLLAMA_HOST") or DEFAULT_HOST
    return host if "://" in host else f"http://{host}"


class OllamaBackend:
    """Chat with a model served by Ollama; one generation at a time by default."""

    name = "ollama"
    default_concurrency = 1
    costly = True

    def __init__(self, settings: BackendSettings) -> None:
        if not settings.models:
            raise ConfigError(
                "the ollama backend needs a model: pass --model, e.g. deepseek-coder:1.3b"
            )
        self.models = settings.models
        self.host = ollama_host(settings.base_url)
        # For messages and logs: a proxy's credentials in the URL stay out of them.
        self.shown_host = redact_url(self.host)
        self.keep_alive = _keep_alive(os.environ.get(KEEP_ALIVE_VARIABLE, DEFAULT_KEEP_ALIVE))
        self._pull = settings.pull
        timeout = httpx.Timeout(settings.timeout_s, connect=CONNECT_TIMEOUT_S)
        self._client = ollama.AsyncClient(
            host=self.host, timeout=timeout, event_hooks={"response": [_note_retry_after]}
        )

    async def __aenter__(self) -> Self:
        checked = False
        try:
            await self._check_start_up()
            checked = True
        finally:
            if not checked:
                # Close the connections the failed check opened.
                await self._client.close()  # type: ignore[no-untyped-call]
        return self

    async def _check_start_up(self) -> None:
        """Check that Ollama answers and has the models, pulling them when asked."""
        try:
            listed = await self._client.list()
        except ollama.ResponseError as exc:
            raise ConfigError(
                f"Ollama at {self.shown_host} refused to list models ({exc.status_code}): "
                f"{redact(exc.error or '')}; check OLLAMA_API_KEY if a proxy guards it"
            ) from None
        except (httpx.TransportError, ConnectionError) as exc:
            raise ConfigError(
                f"Ollama does not answer at {self.shown_host} ({type(exc).__name__}): start it "
                "(`ollama serve`) or set OLLAMA_HOST"
            ) from None
        present = {m.model for m in listed.models if m.model}
        for model in self.models:
            if model in present or f"{model}:latest" in present:
                continue
            if not self._pull:
                raise ConfigError(
                    f"model {model!r} is not in Ollama at {self.shown_host}: "
                    f"run `ollama pull {model}` or start the worker with --pull"
                )
            await self._pull_model(model)

    async def _pull_model(self, model: str) -> None:
        logger.info("pulling model model=%s host=%s", model, self.shown_host)
        last_logged = -PULL_LOG_INTERVAL_S
        try:
            async for progress in await self._client.pull(model, stream=True):
                now = time.monotonic()
                done = progress.total and progress.completed == progress.total
                if progress.total and (done or now - last_logged >= PULL_LOG_INTERVAL_S):
                    percent = 100 * (progress.completed or 0) / progress.total
                    logger.info(
                        "pull progress model=%s status=%s percent=%.0f",
                        model,
                        progress.status,
                        percent,
                    )
                    last_logged = now
        except ollama.ResponseError as exc:
            raise ConfigError(
                f"Ollama at {self.shown_host} could not pull {model!r}: {redact(exc.error or '')}; "
                "check the name at https://ollama.com/library"
            ) from None
        logger.info("model pulled model=%s", model)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self._client.close()  # type: ignore[no-untyped-call]

    async def generate(self, task: Task, model: str, on_piece: OnPiece | None) -> Generation:
        options = _options(task)
        started = time.perf_counter()
        _last_retry_after_s.set(None)
        try:
            if task.prompt is not None:
                # A prompt (what D8 sends) goes to /api/generate, messages to /api/chat.
                return await self._complete(task.prompt, task.system, model, options, on_piece)
            messages = [{"role": m.role, "content": m.content} for m in task.chat_messages()]
            if on_piece is None:
                response = await self._client.chat(
                    model=model, messages=messages, options=options, keep_alive=self.keep_alive
                )
                return _generation(model, response.message.content or "", response, started, None)
            return await self._stream(model, messages, options, on_piece, started)
        except ollama.ResponseError as exc:
            raise _translate(exc, model, self.shown_host) from exc
        except httpx.TimeoutException as exc:
            raise TransientError(
                f"Ollama at {self.shown_host} timed out ({type(exc).__name__})"
            ) from exc
        except (httpx.TransportError, ConnectionError) as exc:
            # A stream cut mid-way (the runner was killed) arrives here too.
            message = f"Ollama at {self.shown_host} unreachable ({type(exc).__name__})"
            raise TransientError(message) from exc

    async def _complete(
        self,
        prompt: str,
        system: str | None,
        model: str,
        options: dict[str, Any],
        on_piece: OnPiece | None,
    ) -> Generation:
        started = time.perf_counter()
        # No system prompt given: None, which the client leaves out of the request, so the
        # model's own (its Modelfile's) applies; its stubs say `str` only.
        if on_piece is None:
            response = await self._client.generate(
                model,
                prompt,
                system=system,  # type: ignore[arg-type]
                options=options,
                keep_alive=self.keep_alive,
            )
            return _generation(model, response.response or "", response, started, None)
        pieces: list[str] = []
        first_piece_at: float | None = None
        last: Any = None
        stream = await self._client.generate(  # type: ignore[call-overload]
            model,
            prompt,
            system=system,
            options=options,
            keep_alive=self.keep_alive,
            stream=True,
        )
        async for part in stream:
            last = part
            if piece := part.response or "":
                if first_piece_at is None:
                    first_piece_at = time.perf_counter()
                pieces.append(piece)
                await on_piece(piece)
        return _generation(model, "".join(pieces), last, started, first_piece_at)

    async def _stream(
        self,
        model: str,
        messages: list[dict[str, str]],
        options: dict[str, Any],
        on_piece: OnPiece,
        started: float,
    ) -> Generation:
        pieces: list[str] = []
        first_piece_at: float | None = None
        last: Any = None
        stream = await self._client.chat(
            model=model, messages=messages, options=options, keep_alive=self.keep_alive, stream=True
        )
        async for part in stream:
            last = part
            piece = part.message.content or ""
            if piece:
                if first_piece_at is None:
                    first_piece_at = time.perf_counter()
                pieces.append(piece)
                await on_piece(piece)
        return _generation(model, "".join(pieces), last, started, first_piece_at)


def _options(task: Task) -> dict[str, Any]:
    options = task.options
    mapped = {
        "temperature": options.temperature,
        "num_predict": options.max_tokens,
        "stop": options.stop,
        "seed": options.seed,
    }
    return {key: value for key, value in mapped.items() if value is not None}


def _generation(
    model: str, text: str, response: Any, started: float, first_piece_at: float | None
) -> Generation:
    prompt_tokens = int(getattr(response, "prompt_eval_count", 0) or 0)
    completion_tokens = int(getattr(response, "eval_count", 0) or 0)
    eval_ns = int(getattr(response, "eval_duration", 0) or 0)
    tokens_per_s = round(completion_tokens / (eval_ns / 1e9), 2) if eval_ns else None
    if first_piece_at is not None:
        ttft_ms: float | None = round((first_piece_at - started) * 1000, 3)
    else:
        # Not streamed: Ollama's own figure, loading the model plus reading the prompt.
        before_first_ns = int(getattr(response, "load_duration", 0) or 0) + int(
            getattr(response, "prompt_eval_duration", 0) or 0
        )
        ttft_ms = round(before_first_ns / 1e6, 3) if before_first_ns else None
    usage = Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        ttft_ms=ttft_ms,
        tokens_per_s=tokens_per_s,
    )
    return Generation(text=text, model=model, usage=usage)


def _keep_alive(value: str) -> str | float:
    """Ollama's keep_alive: a duration string as given, a bare number as seconds."""
    try:
        return float(value)
    except ValueError:
        return value


def _translate(exc: ollama.ResponseError, model: str, host: str) -> MeshError:
    status = exc.status_code
    detail = redact(exc.error or "")
    if status < 0:
        # An error line inside a stream (status -1): the runner failed mid-generation.
        return TransientError(f"Ollama at {host} failed mid-stream: {detail}")
    delay_s = _last_retry_after_s.get() if status == 429 else None
    return error_for_status(
        status, detail, provider=f"Ollama at {host}", model=model, delay_s=delay_s
    )
