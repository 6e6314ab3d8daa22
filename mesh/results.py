"""Writing and reading results and dead letters: the durable outcomes of tasks."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import TYPE_CHECKING, Any

import msgspec
import nats.errors
from nats.js.errors import APIError, BadRequestError, NoStreamResponseError, NotFoundError

from mesh import tracing
from mesh.contract import Result, decode_result, encode
from mesh.errors import CorruptResultError
from mesh.topology import RESULTS_BUCKET, dead_subject, heartbeat_subject, result_subject

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription
    from nats.js import JetStreamContext

__all__ = [
    "DeadLetter",
    "ResultWriter",
    "delete_heartbeat",
    "get_result",
    "publish_dead_letter",
    "readable_result",
    "write_over_deleted",
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
            await js.publish(
                result_subject(result.id), data or encode(result), headers=_CREATE_ONLY
            )
    except BadRequestError as exc:
        if exc.err_code == _WRONG_LAST_SEQUENCE:
            return False
        raise
    return True


async def write_over_deleted(js: JetStreamContext, result: Result, data: bytes) -> bool:
    """Store `result` where the task's earlier result was deleted (`nats kv del`); return
    whether it was stored.

    A deleted key keeps a delete marker, so a create-only write fails as though a result
    were there; this one expects the marker as the key's last message instead. A value that
    is no result at all (written by hand) is replaced the same way.
    """
    try:
        last = await js.get_last_msg(_KV_STREAM, result_subject(result.id), direct=True)
    except NotFoundError:
        return await write_result_once(js, result, data)
    if last.data and _is_result(last.data):
        return False  # a real result: the create-only write lost fairly
    try:
        await js.publish(
            result_subject(result.id),
            data,
            headers={"Nats-Expected-Last-Subject-Sequence": str(last.seq)},
        )
    except BadRequestError as exc:
        if exc.err_code == _WRONG_LAST_SEQUENCE:
            return False
        raise
    return True


def _is_result(data: bytes) -> bool:
    try:
        decode_result(data)
    except msgspec.DecodeError:
        return False
    return True


class _PubAck(msgspec.Struct):
    """The part of a JetStream PubAck a result write needs: the error, if there is one."""

    error: dict[str, Any] | None = None


_decode_puback = msgspec.json.Decoder(_PubAck).decode


class ResultWriter:
    """`write_result_once` for a busy worker: every write shares one reply subscription.

    `js.publish` makes each write a request of its own: a fresh inbox token, a timer, a
    JSON parse of the PubAck into a dataclass. Here a write is a plain publish whose reply
    subject is a counter under one wildcard subscription, and one timer, armed while
    writes are pending, fails those whose PubAck did not come within `timeout_s`, as
    `js.publish` would. The PubAck is still awaited before the caller goes on to ack.
    """

    def __init__(self, nc: NATS, *, timeout_s: float = 10.0) -> None:
        self._nc = nc
        self.timeout_s = timeout_s
        self._prefix = ""
        self._sub: Subscription | None = None
        self._pending: dict[str, tuple[asyncio.Future[None], float]] = {}
        self._tokens = itertools.count()
        self._sweep: asyncio.TimerHandle | None = None

    async def write_once(self, result: Result, data: bytes | None = None) -> bool:
        """Store `result` unless the task already has one; return whether this call stored it."""
        loop = asyncio.get_running_loop()
        if self._sub is None:
            self._prefix = self._nc.new_inbox()
            self._sub = await self._nc.subscribe(f"{self._prefix}.*", cb=self._on_reply)
        token = str(next(self._tokens))
        future: asyncio.Future[None] = loop.create_future()
        self._pending[token] = (future, time.monotonic() + self.timeout_s)
        if self._sweep is None:
            self._sweep = loop.call_later(1.0, self._expire)
        try:
            with tracing.span("d8 result write", result.id):
                await self._nc.publish(
                    result_subject(result.id),
                    data or encode(result),
                    reply=f"{self._prefix}.{token}",
                    headers=_CREATE_ONLY,
                )
                await future
        except BadRequestError as exc:
            if exc.err_code == _WRONG_LAST_SEQUENCE:
                return False
            raise
        finally:
            self._pending.pop(token, None)
        return True

    async def _on_reply(self, msg: Msg) -> None:
        entry = self._pending.pop(msg.subject.rpartition(".")[2], None)
        if entry is None or entry[0].done():
            return
        future = entry[0]
        if not msg.data:
            # A status without a body; 503 means that no stream takes the subject.
            status = msg.headers.get("Status") if msg.headers else None
            error = NoStreamResponseError() if status == "503" else APIError(code=int(status or 0))
            future.set_exception(error)
            return
        error_fields = _decode_puback(msg.data).error
        if error_fields is None:
            future.set_result(None)
            return
        try:
            APIError.from_error(error_fields)
        except APIError as exc:
            future.set_exception(exc)

    def _expire(self) -> None:
        now = time.monotonic()
        for token, (future, deadline) in list(self._pending.items()):
            if now >= deadline and not future.done():
                del self._pending[token]
                future.set_exception(nats.errors.TimeoutError())
        loop = asyncio.get_running_loop()
        self._sweep = loop.call_later(1.0, self._expire) if self._pending else None


async def get_result(js: JetStreamContext, task_id: str) -> Result | None:
    """The stored result of `task_id`, or None while there is none.

    Raises:
        CorruptResultError: the key holds something else (written by hand, for example).
    """
    try:
        msg = await js.get_last_msg(_KV_STREAM, result_subject(task_id), direct=True)
    except NotFoundError:
        return None
    if not msg.data:
        return None
    try:
        return decode_result(msg.data)
    except msgspec.DecodeError as exc:
        raise CorruptResultError(task_id, str(exc)) from None


async def readable_result(js: JetStreamContext, task_id: str) -> Result | None:
    """`get_result`, with a value that is no result logged and taken as none."""
    try:
        return await get_result(js, task_id)
    except CorruptResultError as exc:
        logger.warning("stored result unreadable task_id=%s error=%s", task_id, exc)
        return None


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
