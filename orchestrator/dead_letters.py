"""Turning tasks that used up their deliveries into dead letters and `dead` results.

When no worker settles a task within the consumer's `max_deliver` deliveries (each worker
that took it crashed, or lost its lease), JetStream stops delivering it but keeps it in
the work-queue stream, and says so once on a max-deliveries advisory. The orchestrator
listens to that advisory with core NATS and, for each one: reads the task from `TASKS` by
its stream sequence, copies it to `DEAD` with the reason, stores a `dead` result when the
task id can be read, and deletes the task from `TASKS`. Every step is idempotent (dead
letters are deduplicated by stream sequence, results are create-once), so two
orchestrators, or an orchestrator and a worker, handling one task store it once.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import msgspec
from nats.js.errors import NotFoundError

from mesh.contract import ErrorInfo, Result, decode_task, is_valid_task_id
from mesh.results import get_result, publish_dead_letter, write_result_once
from mesh.topology import TASKS_STREAM, max_deliveries_advisory_subject

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription
    from nats.js import JetStreamContext
    from nats.js.api import RawStreamMsg

__all__ = ["MAX_DELIVERIES_TYPE", "DeadLetterHandler"]

logger = logging.getLogger(__name__)

#: Error type in the dead letter's headers and in the `dead` result.
MAX_DELIVERIES_TYPE = "max_deliveries"
# One orchestrator of a group handles each advisory; the others would only find it done.
_QUEUE_GROUP = "d8-dead-letters"


class _MaxDeliveriesAdvisory(msgspec.Struct, frozen=True, kw_only=True):
    """The part of JetStream's `io.nats.jetstream.advisory.v1.max_deliver` we use."""

    stream: str
    consumer: str
    stream_seq: int
    deliveries: int


_advisory_decoder = msgspec.json.Decoder(_MaxDeliveriesAdvisory)


def _task_id_of(message: RawStreamMsg) -> tuple[str | None, dict[str, object]]:
    """The task id (None when none can be read safely) and the task's metadata."""
    data = message.data or b""
    try:
        task = decode_task(data)
    except (msgspec.DecodeError, RecursionError):
        pass
    else:
        return task.id, task.metadata
    header_id = (message.headers or {}).get("Nats-Msg-Id")
    if is_valid_task_id(header_id):
        return header_id, {}
    try:
        raw = msgspec.json.decode(data)
    except (msgspec.DecodeError, RecursionError):
        return None, {}
    candidate = raw.get("id") if isinstance(raw, dict) else None
    return (candidate, {}) if is_valid_task_id(candidate) else (None, {})


class DeadLetterHandler:
    """Handles max-deliveries advisories for every consumer of `TASKS`."""

    def __init__(self, nc: NATS, js: JetStreamContext) -> None:
        self._nc = nc
        self._js = js
        self._sub: Subscription | None = None
        #: Tasks this handler dead-lettered, for tests and status.
        self.handled = 0

    async def start(self) -> None:
        """Subscribe to the advisories (one member of the queue group gets each), then sweep."""
        self._sub = await self._nc.subscribe(
            max_deliveries_advisory_subject(), queue=_QUEUE_GROUP, cb=self._on_advisory
        )
        try:
            await self.sweep()
        except Exception:
            # Best effort: new advisories are handled all the same, and the next start
            # sweeps again; a hiccup here must not keep the orchestrator from starting.
            logger.exception("sweep of missed max-deliveries advisories failed")

    async def sweep(self) -> int:
        """Dead-letter tasks whose advisory nobody heard (no orchestrator was running).

        Such a task stays in `TASKS` below the consumer's delivered sequence, undelivered
        for good. While no task is on lease or waiting for redelivery (`num_ack_pending`
        0), every task left there is one, since an acked or termed task leaves a work
        queue. A consumer with tasks on lease is skipped: its own tasks are alike there.

        LIMITATION: a task whose advisory was missed waits for a start of the orchestrator
        at a moment when its consumer has nothing on lease.
        """
        swept = 0
        for consumer in await self._js.consumers_info(TASKS_STREAM):
            config = consumer.config
            if consumer.num_ack_pending or not config.filter_subject or consumer.delivered is None:
                continue
            seq = (consumer.ack_floor.stream_seq if consumer.ack_floor else 0) + 1
            while seq <= (consumer.delivered.stream_seq or 0):
                try:
                    stuck = await self._js.get_msg(
                        TASKS_STREAM, seq, subject=config.filter_subject, next=True
                    )
                except NotFoundError:
                    break
                if stuck.seq is None or stuck.seq > (consumer.delivered.stream_seq or 0):
                    break
                if await self.handle(stuck.seq, config.max_deliver or 0, consumer.name):
                    swept += 1
                seq = stuck.seq + 1
        if swept:
            logger.warning("swept tasks whose max-deliveries advisory was missed count=%d", swept)
        return swept

    async def stop(self) -> None:
        if self._sub is not None:
            sub, self._sub = self._sub, None
            await sub.unsubscribe()

    async def _on_advisory(self, msg: Msg) -> None:
        try:
            advisory = _advisory_decoder.decode(msg.data)
        except msgspec.DecodeError as exc:
            logger.warning(
                "undecodable max-deliveries advisory subject=%s error=%s", msg.subject, exc
            )
            return
        try:
            await self.handle(advisory.stream_seq, advisory.deliveries, advisory.consumer)
        except Exception:
            # The task stays in TASKS, undelivered; `nats stream get TASKS <seq>` shows it.
            logger.exception(
                "dead letter failed stream_seq=%d consumer=%s",
                advisory.stream_seq,
                advisory.consumer,
            )

    async def handle(self, stream_seq: int, deliveries: int, consumer: str) -> bool:
        """Dead-letter the task at `stream_seq`; return whether this call did it."""
        try:
            message = await self._js.get_msg(TASKS_STREAM, stream_seq)
        except NotFoundError:
            # Settled meanwhile (a late ack, a worker's own term), or handled by a peer.
            logger.info("max deliveries for a task already gone stream_seq=%d", stream_seq)
            return False
        task_id, metadata = _task_id_of(message)
        if task_id is not None and await get_result(self._js, task_id) is not None:
            # A worker stored the result but its ack was lost: nothing to mourn.
            await self._js.delete_msg(TASKS_STREAM, stream_seq)
            logger.warning("max deliveries for a finished task task_id=%s", task_id)
            return False

        reason = (
            f"no worker settled it in {deliveries} deliveries (consumer {consumer}): "
            "each worker that took it crashed or lost its lease"
        )
        await publish_dead_letter(
            self._js,
            subject=message.subject or "",
            data=message.data or b"",
            reason=reason,
            error_type=MAX_DELIVERIES_TYPE,
            attempts=deliveries,
            stream_seq=stream_seq,
            task_id=task_id,
            worker_id=None,
        )
        if task_id is not None:
            result = Result(
                id=task_id,
                status="dead",
                attempt=deliveries,
                error=ErrorInfo(type=MAX_DELIVERIES_TYPE, message=reason),
                metadata=metadata,
                finished_at=time.time(),
            )
            await write_result_once(self._js, result)
        await self._js.delete_msg(TASKS_STREAM, stream_seq)
        self.handled += 1
        logger.warning(
            "task dead after max deliveries task_id=%s stream_seq=%d deliveries=%d consumer=%s",
            task_id,
            stream_seq,
            deliveries,
            consumer,
        )
        return True
