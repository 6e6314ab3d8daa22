"""The mesh's errors, grouped by what the caller must do about them.

- `InvalidTaskError`: the task itself is wrong; no retry, an error result, a dead letter.
- `RetryableError` (`RateLimitedError`, `TransientError`): try again later; nak with a delay.
- `WorkerFatalError`: this worker cannot serve at all (bad credentials, model missing);
  the task goes back to the queue and the worker stops serving.
- `ConfigError`: a setting is wrong; the process exits at start-up with a fix-it message.
- `NatsUnreachableError`: NATS is away; try again once it is back (HTTP 503).
- `CorruptResultError`: the `results` bucket holds something that is not a result.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "CorruptResultError",
    "DeadlineError",
    "InvalidTaskError",
    "MeshError",
    "NatsUnreachableError",
    "RateLimitedError",
    "RetryableError",
    "SubmitError",
    "TaskRejectedError",
    "TaskTooLargeError",
    "TransientError",
    "WorkerFatalError",
]


class MeshError(Exception):
    """Root of every error the mesh raises on purpose."""

    #: Stable name written into results and dead-letter headers.
    type_name = "mesh_error"


class InvalidTaskError(MeshError, ValueError):
    """The task breaks the contract or asks for something no retry can give."""

    type_name = "invalid_task"


class SubmitError(MeshError):
    """A task could not be submitted; the message says why and what to change."""

    type_name = "submit_error"


class TaskRejectedError(SubmitError, ValueError):
    """A task refused before it was sent: no worker could run it as it is."""

    type_name = "invalid_task"


class TaskTooLargeError(TaskRejectedError):
    """A task bigger than the server's max_payload."""

    type_name = "task_too_large"


class RetryableError(MeshError):
    """A failure that may pass; the task is retried after `delay_s` (None: backoff)."""

    type_name = "retryable"

    def __init__(self, message: str, *, delay_s: float | None = None) -> None:
        super().__init__(message)
        self.delay_s = delay_s


class RateLimitedError(RetryableError):
    """The provider said slow down; `delay_s` is its retry-after when it gave one."""

    type_name = "rate_limited"


class TransientError(RetryableError):
    """A server error, a dropped connection or a timeout talking to the backend."""

    type_name = "transient"


class WorkerFatalError(MeshError):
    """This worker cannot serve any task (bad credentials, model not available)."""

    type_name = "worker_fatal"


class DeadlineError(MeshError, TimeoutError):
    """The task's deadline passed before or while it ran."""

    type_name = "deadline"


class ConfigError(MeshError):
    """A setting is missing or wrong; the message says how to fix it."""

    type_name = "config"


class NatsUnreachableError(MeshError, ConnectionError):
    """NATS was away (or did not answer) while the orchestrator served a request.

    `sent` says whether the request had gone out: a submit that was sent may still be stored
    and run once NATS is back, one that was not sent was not submitted.
    """

    type_name = "nats_unreachable"

    def __init__(
        self,
        action: str,
        *,
        sent: bool,
        away_s: float,
        task_ids: tuple[str, ...] = (),
        reason: str | None = None,
    ) -> None:
        self.action = action
        self.sent = sent
        self.away_s = away_s
        self.task_ids = task_ids
        self.reason = reason
        cause = reason or f"no connection for {away_s:.1f}s"
        one = len(task_ids) == 1
        if task_ids and sent:
            message = (
                f"NATS did not confirm {_some(task_ids)} ({cause}); "
                f"{'it' if one else 'they'} may still run: resubmit with the same "
                f"{'id, which is' if one else 'ids, which are'} deduplicated"
            )
        elif task_ids:
            message = (
                f"NATS is unreachable ({cause}): {_some(task_ids)} "
                f"{'was' if one else 'were'} not submitted; submit again once NATS is back"
            )
        else:
            message = f"NATS is unreachable ({cause}): cannot {action}; try again once it is back"
        super().__init__(message)


def _some(task_ids: tuple[str, ...], shown: int = 3) -> str:
    # A batch may hold thousands of ids: name a few.
    if len(task_ids) == 1:
        return f"task {task_ids[0]}"
    more = f" and {len(task_ids) - shown} more" if len(task_ids) > shown else ""
    return f"tasks {', '.join(task_ids[:shown])}{more}"


class CorruptResultError(MeshError, ValueError):
    """The value stored under a task id in the `results` bucket is not a d8 result."""

    type_name = "corrupt_result"

    def __init__(self, task_id: str, detail: str) -> None:
        self.task_id = task_id
        self.detail = detail
        super().__init__(
            f"the value stored for task {task_id} in the results bucket is not a d8 result "
            f"({detail}); `nats kv del results {task_id}` removes it"
        )
