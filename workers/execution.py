"""Running one delivered task to its outcome: a result, a retry, or a dead letter.

Every path ends in exactly one JetStream action on the message (ack, nak with a delay, or
term) and, except for a retry, one stored result. The result is stored before the ack, so
a crash in between gives a redelivery that finds the result and only acks.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio
import msgspec
import nats.errors

from mesh.contract import (
    ErrorInfo,
    Result,
    Status,
    Task,
    Timings,
    Usage,
    decode_task,
    encode,
    is_valid_task_id,
)
from mesh.errors import (
    InvalidTaskError,
    RateLimitedError,
    RetryableError,
    WorkerFatalError,
)
from mesh.results import (
    ResultWriter,
    publish_dead_letter,
    readable_result,
    write_over_deleted,
    write_result_once,
)
from mesh.topology import (
    ANY_MODEL,
    Capability,
    chunk_subject,
    model_token,
    stored_result_subject,
)
from workers.backends._errors import redact

if TYPE_CHECKING:
    from collections.abc import Callable

    from nats.aio.client import Client as NATS
    from nats.aio.msg import Msg
    from nats.js import JetStreamContext

    from workers.backends import Backend, Generation, OnPiece

__all__ = ["Outcome", "RetryPolicy", "TaskRunner", "task_deadline"]

logger = logging.getLogger(__name__)

# A task pulled before a rate limit waits it out when it ends within this; after a longer
# limit the task is handed back for another worker, at the price of one delivery.
HAND_BACK_AFTER_S = 10.0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When and how often a failed task is tried again."""

    max_deliver: int = 5
    base_delay_s: float = 2.0
    max_delay_s: float = 60.0

    def delay_s(self, attempt: int, hinted_s: float | None) -> float:
        """The provider's hint when it gave one, else exponential backoff with jitter."""
        if hinted_s is not None and hinted_s >= 0:
            return min(float(hinted_s), self.max_delay_s * 10)
        backoff: float = min(self.max_delay_s, self.base_delay_s * 2.0 ** (attempt - 1))
        return backoff * random.uniform(0.8, 1.2)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one delivery, for counters and the per-task log line."""

    status: str
    task_id: str | None
    attempt: int


def task_deadline(task: Task, published_at: float) -> float | None:
    """The task's absolute deadline: the earlier of `deadline` and publish time + timeout."""
    candidates = [task.deadline] if task.deadline is not None else []
    if task.timeout_s is not None:
        candidates.append(published_at + task.timeout_s)
    return min(candidates) if candidates else None


def _recover_task_id(msg: Msg) -> str | None:
    """The id of a task that failed to decode, when one can be found safely."""
    header_id = msg.headers.get("Nats-Msg-Id") if msg.headers else None
    if is_valid_task_id(header_id):
        return header_id
    try:
        raw = msgspec.json.decode(msg.data)
    except (msgspec.DecodeError, RecursionError):
        return None
    candidate = raw.get("id") if isinstance(raw, dict) else None
    return candidate if is_valid_task_id(candidate) else None


class TaskRunner:
    """Runs delivered tasks on one backend and settles each message."""

    def __init__(
        self,
        *,
        nc: NATS,
        js: JetStreamContext,
        backend: Backend,
        worker_id: str,
        retry: RetryPolicy,
        on_fatal: Callable[[WorkerFatalError], None],
    ) -> None:
        self._nc = nc
        self._js = js
        self._backend = backend
        self._worker_id = worker_id
        self._retry = retry
        self._on_fatal = on_fatal
        self._models = {model_token(m): m for m in backend.models}
        self._results = ResultWriter(nc)
        # After a rate limit, no call starts before this (time.monotonic()).
        self._calm_at = 0.0

    def paused_s(self) -> float:
        """How long the backend's rate limit still holds calls back; 0 when it does not.

        One 429 pauses the whole worker, not only its task: the provider counts calls per
        account, and the next task's call would meet the same limit.
        """
        return max(0.0, self._calm_at - time.monotonic())

    async def run(self, msg: Msg) -> Outcome:
        """Run one delivery to its outcome; never raises for a task's content."""
        metadata = msg.metadata
        attempt = metadata.num_delivered
        received_at = time.time()
        try:
            task = decode_task(msg.data)
        except (msgspec.DecodeError, RecursionError) as exc:
            task_id = _recover_task_id(msg)
            await self._reject(
                msg, task_id, f"invalid task: {exc}", "invalid_task", attempt, dead=False
            )
            return Outcome("error", task_id, attempt)

        # A redelivery may find its result stored by an earlier attempt whose ack was lost; a
        # costly backend also looks on a first delivery (an id reused after the window).
        if (attempt > 1 or self._backend.costly) and (
            earlier := await readable_result(self._js, task.id)
        ) is not None:
            if attempt == 1:
                await self._announce(earlier, task.reply_to)
            await msg.ack()
            logger.warning("task already done task_id=%s attempt=%d", task.id, attempt)
            return Outcome("duplicate", task.id, attempt)

        published_at = metadata.timestamp.timestamp()
        deadline = task_deadline(task, published_at)
        base = _Base(
            task,
            attempt,
            published_at,
            received_at,
            self._worker_id,
            self._backend.name,
            str(Capability.from_subject(msg.subject)),
        )
        if deadline is not None and received_at >= deadline:
            await self._finish(msg, base.expired("deadline passed while queued"), task.reply_to)
            return Outcome("expired", task.id, attempt)

        try:
            model = self._pick_model(task, msg.subject)
            generation, chunks = await self._generate(task, model, deadline)
        except InvalidTaskError as exc:
            await self._reject(
                msg, task.id, str(exc), exc.type_name, attempt, dead=False, base=base
            )
            return Outcome("error", task.id, attempt)
        except RetryableError as exc:
            return await self._retry_later(msg, base, exc)
        except WorkerFatalError as exc:
            # Not this task's fault: hand it back for another worker, and stop serving.
            await msg.nak(delay=self._retry.base_delay_s)
            self._on_fatal(exc)
            return Outcome("returned", task.id, attempt)
        except Exception as exc:
            logger.exception("backend failed unexpectedly task_id=%s attempt=%d", task.id, attempt)
            return await self._retry_later(
                msg, base, RetryableError(redact(f"{type(exc).__name__}: {exc}"))
            )

        if generation is None:
            stored = await self._finish(
                msg, base.expired("deadline passed while running"), task.reply_to
            )
            return Outcome("expired" if stored else "late", task.id, attempt)
        stored = await self._finish(msg, base.ok(generation, chunks), task.reply_to)
        # Not stored: another attempt of this task (a redelivery after a lost lease) won.
        return Outcome("ok" if stored else "late", task.id, attempt)

    def _pick_model(self, task: Task, subject: str) -> str:
        queue_token = Capability.from_subject(subject).token
        wanted = model_token(task.model) if task.model else queue_token
        if wanted == ANY_MODEL:
            return self._backend.models[0]
        if task.model and queue_token not in (ANY_MODEL, wanted):
            raise InvalidTaskError(
                f"task names model {task.model!r} but was published to {subject}: "
                f"publish it to tasks.{Capability.from_subject(subject).kind}.{wanted}"
            )
        model = self._models.get(wanted)
        if model is None:
            served = ", ".join(self._backend.models)
            raise InvalidTaskError(
                f"model {task.model!r} is not served by this worker (it serves {served})"
            )
        return model

    async def _generate(
        self, task: Task, model: str, deadline: float | None
    ) -> tuple[Generation | None, int]:
        if (pause_s := self.paused_s()) > 0:
            if pause_s > HAND_BACK_AFTER_S:
                # A long limit: hand the task back at once for a worker that is not limited.
                raise RateLimitedError(
                    f"this worker is rate limited for {pause_s:.0f}s more: handed back",
                    delay_s=0,
                )
            # Pulled before a short limit hit: wait it out here (the lease is kept alive)
            # rather than nak, which would cost the task a delivery without calling anyone.
            if deadline is not None and time.time() + pause_s >= deadline:
                return None, 0
            await anyio.sleep(pause_s)
        on_piece, count = self._chunk_publisher(task) if task.stream else (None, None)
        if deadline is None:
            generation = await self._backend.generate(task, model, on_piece)
        else:
            with anyio.move_on_after(deadline - time.time()):
                return await self._backend.generate(task, model, on_piece), count() if count else 0
            return None, 0
        return generation, count() if count else 0

    def _chunk_publisher(self, task: Task) -> tuple[OnPiece, Callable[[], int]]:
        subject = chunk_subject(task.id)
        sequence = 0

        async def on_piece(piece: str) -> None:
            nonlocal sequence
            sequence += 1
            await self._nc.publish(subject, piece.encode(), headers={"D8-Chunk-Seq": str(sequence)})

        return on_piece, lambda: sequence

    async def _retry_later(self, msg: Msg, base: _Base, exc: RetryableError) -> Outcome:
        if base.attempt >= self._retry.max_deliver:
            reason = f"gave up after {base.attempt} attempts: {exc}"
            await self._reject(
                msg, base.task.id, reason, exc.type_name, base.attempt, dead=True, base=base
            )
            return Outcome("dead", base.task.id, base.attempt)
        delay_s = self._retry.delay_s(base.attempt, exc.delay_s)
        if isinstance(exc, RateLimitedError):
            # LIMITATION: the nak still costs this task a delivery; `max_deliver` 429s in a
            # row make it dead though nothing is wrong with it.
            self._calm_at = max(self._calm_at, time.monotonic() + delay_s)
        await msg.nak(delay=delay_s)
        logger.warning(
            "task will be retried task_id=%s attempt=%d delay_s=%.1f error=%s",
            base.task.id,
            base.attempt,
            delay_s,
            exc,
        )
        return Outcome("retry", base.task.id, base.attempt)

    async def _reject(
        self,
        msg: Msg,
        task_id: str | None,
        reason: str,
        error_type: str,
        attempt: int,
        *,
        dead: bool,
        base: _Base | None = None,
    ) -> None:
        """Dead-letter the task, store an error (or dead) result when it has an id, and term it."""
        metadata = msg.metadata
        await publish_dead_letter(
            self._js,
            subject=msg.subject,
            data=msg.data,
            reason=reason,
            error_type=error_type,
            attempts=attempt,
            stream_seq=metadata.sequence.stream,
            task_id=task_id,
            worker_id=self._worker_id,
        )
        if task_id is not None:
            status: Status = "dead" if dead else "error"
            error = ErrorInfo(type=error_type, message=reason)
            result = (
                base.failed(status, error)
                if base
                else Result(
                    id=task_id,
                    status=status,
                    error=error,
                    worker_id=self._worker_id,
                    backend=self._backend.name,
                    attempt=attempt,
                    finished_at=time.time(),
                    capability=str(Capability.from_subject(msg.subject)),
                )
            )
            await write_result_once(self._js, result)
        await msg.term()
        logger.warning(
            "task rejected task_id=%s attempt=%d type=%s reason=%s",
            task_id,
            attempt,
            error_type,
            reason,
        )

    async def _finish(self, msg: Msg, result: Result, reply_to: str | None) -> bool:
        """Store the result, answer `reply_to`, ack; return whether this result was stored."""
        data = encode(result)
        try:
            stored = await self._results.write_once(result, data)
        except nats.errors.MaxPayloadError:
            # LIMITATION: an output over the server's max_payload is not chunked into an
            # object store; the task ends as an `output_too_large` error.
            error = ErrorInfo(
                type="output_too_large", message=f"output of {len(data)} bytes exceeds max_payload"
            )
            result = msgspec.structs.replace(result, status="error", output="", error=error)
            data = encode(result)
            stored = await self._results.write_once(result, data)
        if not stored:
            earlier = await readable_result(self._js, result.id)
            if earlier is None:
                # Not a lost race: an operator deleted the earlier result.
                stored = await write_over_deleted(self._js, result, data)
            elif result.attempt == 1:
                await self._announce(earlier, reply_to)
        if stored and reply_to:
            await self._nc.publish(reply_to, data)
        await msg.ack()
        return stored

    async def _announce(self, stored: Result, reply_to: str | None) -> None:
        """Tell waiters about a result stored before this delivery (the id was used again
        after the duplicate window): the bucket republishes only new writes."""
        data = encode(stored)
        await self._nc.publish(stored_result_subject(stored.id), data)
        if reply_to:
            await self._nc.publish(reply_to, data)


@dataclass(frozen=True, slots=True)
class _Base:
    """The facts every result of one delivery shares."""

    task: Task
    attempt: int
    published_at: float
    received_at: float
    worker_id: str
    backend: str
    capability: str | None = None

    def _timings(self) -> tuple[Timings, float]:
        now = time.time()
        return (
            Timings(
                queued_ms=round(max(0.0, self.received_at - self.published_at) * 1000, 3),
                run_ms=round((now - self.received_at) * 1000, 3),
                total_ms=round(max(0.0, now - self.published_at) * 1000, 3),
            ),
            now,
        )

    def _result(self, status: str, **fields: object) -> Result:
        timings, now = self._timings()
        return Result(
            id=self.task.id,
            status=status,  # type: ignore[arg-type]
            worker_id=self.worker_id,
            backend=self.backend,
            attempt=self.attempt,
            timings=timings,
            metadata=self.task.metadata,
            finished_at=now,
            capability=self.capability,
            **fields,  # type: ignore[arg-type]
        )

    def ok(self, generation: Generation, chunks: int) -> Result:
        return self._result(
            "ok",
            output=generation.text,
            usage=generation.usage,
            model=generation.model,
            chunks=chunks,
        )

    def expired(self, why: str) -> Result:
        return self._result("expired", error=ErrorInfo(type="deadline", message=why))

    def failed(self, status: str, error: ErrorInfo) -> Result:
        return self._result(status, error=error, usage=Usage())
