"""One mapping from a provider's HTTP failure to the mesh's error taxonomy, for every backend.

| provider says                       | mesh error          | what the runner does                |
| ----------------------------------- | ------------------- | ----------------------------------- |
| 429 (with or without retry-after)   | `RateLimitedError`  | nak with retry-after, else backoff  |
| 408, 409, 5xx, timeout, dropped     | `TransientError`    | nak with backoff                    |
| 400, 413, 422, blocked, no answer   | `InvalidTaskError`  | error result, dead letter, term     |
| 401, 403, 404 (model), no quota     | `WorkerFatalError`  | task handed back, worker stops      |
"""

from __future__ import annotations

import email.utils
import time
from typing import TYPE_CHECKING

from mesh.errors import (
    InvalidTaskError,
    MeshError,
    RateLimitedError,
    TransientError,
    WorkerFatalError,
)
from mesh.logs import secret_values

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "ContentBlockedError",
    "EmptyAnswerError",
    "error_for_status",
    "redact",
    "retry_after_s",
]

# Provider messages can be long (a whole JSON body); a result keeps the gist.
_DETAIL_CHARS = 300


class ContentBlockedError(InvalidTaskError):
    """The provider refused the prompt or the answer (safety, recitation, content filter)."""

    type_name = "blocked"


class EmptyAnswerError(InvalidTaskError):
    """The provider answered without any candidate or choice to take the text from."""

    type_name = "empty_answer"


def retry_after_s(headers: Mapping[str, str] | None) -> float | None:
    """The delay a 429 asks for: `retry-after-ms`, else `retry-after` in seconds or as a date."""
    if not headers:
        return None
    milliseconds = headers.get("retry-after-ms")
    if milliseconds is not None:
        try:
            return max(0.0, float(milliseconds) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def redact(text: str, *secrets: str | None) -> str:
    """`text` cut to a readable length, with every given secret, and the value of every
    `SECRET_VARIABLES` variable, replaced by `***`."""
    for secret in (*secrets, *secret_values()):
        if secret:
            text = text.replace(secret, "***")
    flat = " ".join(text.split())
    return flat if len(flat) <= _DETAIL_CHARS else flat[: _DETAIL_CHARS - 3] + "..."


def error_for_status(
    status: int,
    detail: str,
    *,
    provider: str,
    model: str,
    delay_s: float | None = None,
) -> MeshError:
    """The mesh error for an HTTP status from `provider`; `detail` must already be redacted."""
    if status == 429:
        return RateLimitedError(f"{provider} is rate limiting (429): {detail}", delay_s=delay_s)
    if status in (401, 403):
        return WorkerFatalError(
            f"{provider} refused this worker's credentials ({status}): {detail}; "
            "check the API key and its permissions"
        )
    if status == 404:
        # LIMITATION: this stops the whole worker, also the queues of the other models it
        # serves; only a worker with one model (the usual Pi) is stopped exactly right.
        return WorkerFatalError(f"{provider} does not serve model {model!r} (404): {detail}")
    if status in (400, 413, 422):
        return InvalidTaskError(f"{provider} rejected the task ({status}): {detail}")
    # 408, 409, 5xx and anything unexpected may pass; the retry budget bounds it.
    return TransientError(f"{provider} failed ({status}): {detail}")
