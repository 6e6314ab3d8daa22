"""The mesh's errors, grouped by what the caller must do about them.

- `InvalidTaskError`: the task itself is wrong; no retry, an error result, a dead letter.
- `RetryableError` (`RateLimitedError`, `TransientError`): try again later; nak with a delay.
- `WorkerFatalError`: this worker cannot serve at all (bad credentials, model missing);
  the task goes back to the queue and the worker stops serving.
- `ConfigError`: a setting is wrong; the process exits at start-up with a fix-it message.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DeadlineError",
    "InvalidTaskError",
    "MeshError",
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
