"""A deterministic backend that answers with the task's own text, for demos, tests and benchmarks.

Tests steer it through the task's metadata key `echo` (ignored by every other backend):
`{"echo": {"sleep_s": 2.0}}` makes it take that long, `{"echo": {"fail": KIND}}` makes it
fail with KIND in `transient`, `rate_limited`, `invalid` (never a worker-level failure:
a task must not be able to stop a worker), and `"fail_times": N`
fails only the first N runs of that task id in this process.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import TYPE_CHECKING, Any, Self

import anyio

from mesh.contract import Usage
from mesh.errors import InvalidTaskError, RateLimitedError, TransientError
from workers.backends import BackendSettings, Generation, OnPiece

if TYPE_CHECKING:
    from types import TracebackType

    from mesh.contract import Task

__all__ = ["EchoBackend"]

_FAILURES: dict[str, type[Exception]] = {
    "transient": TransientError,
    "rate_limited": RateLimitedError,
    "invalid": InvalidTaskError,
}


class EchoBackend:
    """Answers `echo: <last message>`; costs nothing, needs nothing."""

    name = "echo"
    default_concurrency = 64
    costly = False

    def __init__(self, settings: BackendSettings) -> None:
        self.models = settings.models or ("echo",)
        self._runs: Counter[str] = Counter()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        return None

    async def generate(self, task: Task, model: str, on_piece: OnPiece | None) -> Generation:
        started = time.perf_counter()
        steer = task.metadata.get("echo") if task.metadata else None
        if isinstance(steer, dict):
            await self._obey(task.id, steer)

        messages = task.chat_messages()
        text = f"echo: {messages[-1].content}"
        if on_piece is not None:
            for index, word in enumerate(text.split(" ")):
                await on_piece(word if index == 0 else " " + word)

        prompt_tokens = sum(len(m.content.split()) for m in messages)
        completion_tokens = len(text.split())
        elapsed_s = max(time.perf_counter() - started, 1e-6)
        usage = Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            ttft_ms=0.0,
            tokens_per_s=round(completion_tokens / elapsed_s, 1),
        )
        return Generation(text=text, model=model, usage=usage)

    async def _obey(self, task_id: str, steer: dict[str, Any]) -> None:
        sleep_s = steer.get("sleep_s")
        if isinstance(sleep_s, int | float) and sleep_s > 0:
            # Stands in for a slow generation; tests cancel or outwait it, never sync on it.
            await anyio.sleep(float(sleep_s))
        failure = _FAILURES.get(str(steer.get("fail", "")))
        if failure is None:
            return
        self._runs[task_id] += 1
        fail_times = steer.get("fail_times")
        if isinstance(fail_times, int) and self._runs[task_id] > fail_times:
            return
        if issubclass(failure, RateLimitedError):
            raise RateLimitedError(
                "echo was told to fail: rate limited", delay_s=steer.get("retry_after_s")
            )
        raise failure(f"echo was told to fail: {steer['fail']}")
