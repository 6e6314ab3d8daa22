"""Writing and reading results and dead letters: the durable outcomes of tasks."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from nats.js.errors import BadRequestError, NotFoundError

from mesh import tracing
from mesh.contract import Result, decode_result, encode
from mesh.topology import RESULTS_BUCKET, dead_subject, heartbeat_subject, result_subject

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS
    from nats.js import JetStreamContext

__all__ = [
    "DeadLetter",
    "delete_heartbeat",
    "get_result",
    "publish_dead_letter",
    "write_result_once",
]

logger = logging.getLogger(__name__)

# JetStream's "wrong last sequence" error: the result key already has a value.
_WRONG_LAST_SEQUENCE = 10071
# Writes a value only when the key has none, like `kv.create`, in one publish.
_CREATE_ONLY = {"Nats-Expected-Last-Subject-Sequence": "0"}
_KV_STREAM = f"KV_{RESULTS_BUCKET}"


async def write_result_once(
    js: JetStreamContext, result: Result, data: bytes | None = None
) -> bool:
    """Store `result` unless the task already has one; return whether this call stored it.

    Two attempts of one task can race (a redelivery while the first worker still runs); the
    server accepts only the first write, so a task has exactly one result.
    """
    try:
        with tracing.span("d8 result write", result.id):
            await js.publish(result_subject(result.id), data or encode(result), headers=_CREATE_ONLY)
    except BadRequestError as exc:
        if exc.err_code == _WRONG_LAST_SEQUENCE:
            return False
        raise
    return True


async def get_result(js: JetStreamContext, task_id: str) -> Result | None:
    """The stored result of `task_id`, or None while there is none."""
    try:
        msg = await js.get_last_msg(_KV_STREAM, result_subject(task_id), direct=True)
    except NotFoundError:
        return None
    if not msg.data:
        return None
    return decode_result(msg.data)


class DeadLetter:
    """Header names of a dead letter in the `DEAD` stream; the body is the task as sent."""

    REASON = "D8-Dead-Reason"
    ERROR_TYPE = "D8-Error-Type"
    ATTEMPTS = "D8-Attempts"
    SUBJECT = "D8-Subject"
    TASK_ID = "D8-Task-Id"
    STREAM_SEQ = "D8-Stream-Seq"
    WORKER_ID = "D8-Worker-Id"


async def publish_dead_letter(
    js: JetStreamContext,
    *,
    subject: str,
    data: bytes,
    reason: str,
    error_type: str,
    attempts: int,
    stream_seq: int,
    task_id: str | None,
    worker_id: str | None,
) -> None:
    """Copy a task that will not run into `DEAD`, with why in its headers.

    The dead letter's own `Nats-Msg-Id` is the original stream sequence, so a worker and the
    orchestrator that both dead-letter one task store it once.
    """
    headers = {
        DeadLetter.REASON: _header_safe(reason),
        DeadLetter.ERROR_TYPE: error_type,
        DeadLetter.ATTEMPTS: str(attempts),
        DeadLetter.SUBJECT: subject,
        DeadLetter.STREAM_SEQ: str(stream_seq),
        "Nats-Msg-Id": f"dead-{stream_seq}",
    }
    if task_id:
        headers[DeadLetter.TASK_ID] = task_id
    if worker_id:
        headers[DeadLetter.WORKER_ID] = worker_id
    await js.publish(dead_subject(subject), data, headers=headers)


def _header_safe(text: str, limit: int = 1000) -> str:
    # Header values are one line of printable text in the NATS protocol.
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


async def delete_heartbeat(nc: NATS, worker_id: str) -> None:
    """Remove a worker's heartbeat at once (a KV delete), so watchers see it leave."""
    await nc.publish(heartbeat_subject(worker_id), b"", headers={"KV-Operation": "DEL"})
    await nc.flush(timeout=2)
