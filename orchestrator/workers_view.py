"""Live workers as the `workers` bucket shows them, kept by a watch, never by polling.

A worker that stops deletes its heartbeat; one that dies stops beating and its key
expires, which the server marks with a delete marker (nats-server 2.11+): either way the
watch hears of it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio
import msgspec
from nats.js.errors import NotFoundError

from mesh.connection import NATS_ERRORS
from mesh.contract import Heartbeat, decode_heartbeat
from mesh.topology import WORKERS_BUCKET

if TYPE_CHECKING:
    from collections.abc import Callable

    from nats.js import JetStreamContext
    from nats.js.kv import KeyValue

__all__ = ["WorkersView"]

logger = logging.getLogger(__name__)

# Pauses between attempts to set up the watch again: a leader election takes a few seconds,
# so 0.5 s doubling to 5 s finds the new leader soon without busy-looping.
_REWATCH_FIRST_S = 0.5
_REWATCH_MAX_S = 5.0


class WorkersView:
    """The live workers by id, their changes as events, and the watch that keeps them."""

    def __init__(self, js: Callable[[], JetStreamContext]) -> None:
        # A callable: the owner's JetStream context exists only once it is connected.
        self._js = js
        self.workers: dict[str, Heartbeat] = {}
        #: Set at the next change of `workers`, then replaced by a fresh event.
        self.changed = anyio.Event()
        #: Set once the first snapshot of the bucket is in `workers`.
        self.loaded = anyio.Event()
        self._rewatch = anyio.Event()

    def rewatch(self) -> None:
        """Start the watch afresh (after a reconnect)."""
        self._rewatch.set()

    def live_capabilities(self) -> set[str]:
        """Capabilities (`kind/token`) that at least one live worker serves."""
        return {c for hb in self.workers.values() for c in hb.capabilities}

    async def wait_for(self, count: int, timeout_s: float) -> bool:
        """Wait until `count` workers are live, at most `timeout_s`; whether they are."""
        with anyio.move_on_after(timeout_s):
            while len(self.workers) < count:
                await self.changed.wait()
        return len(self.workers) >= count

    async def run(self) -> None:
        """Watch the bucket until cancelled, afresh after each `rewatch()`."""
        try:
            kv: KeyValue = await self._js().key_value(WORKERS_BUCKET)
        except NotFoundError:
            # Nobody declared the topology yet: no worker can be live, and a submit will say
            # what is missing.
            logger.warning("no %s bucket: is the orchestrator running?", WORKERS_BUCKET)
            self.loaded.set()
            return
        while True:
            self._rewatch = anyio.Event()
            async with anyio.create_task_group() as group:
                group.start_soon(self._keep_following_heartbeats, kv)
                # After a reconnect the watch's ordered consumer only notices it lost its
                # place when its idle heartbeat is missed (15 s and more); start afresh.
                await self._rewatch.wait()
                group.cancel_scope.cancel()
            logger.info("watching workers anew after a reconnect")

    async def _keep_following_heartbeats(self, kv: KeyValue) -> None:
        """Follow the bucket; a watch that cannot be set up (JetStream failing over) or that
        ends is set up again, after a pause that grows to `_REWATCH_MAX_S`."""
        pause_s = _REWATCH_FIRST_S
        while True:
            try:
                await self._follow_heartbeats(kv)
            except NATS_ERRORS as exc:
                logger.warning("workers watch failed, retrying error=%r pause_s=%.1f", exc, pause_s)
            await anyio.sleep(pause_s)
            pause_s = min(2 * pause_s, _REWATCH_MAX_S)

    async def _follow_heartbeats(self, kv: KeyValue) -> None:
        watcher = await kv.watchall()
        snapshot = _Snapshot()
        try:
            async for entry in watcher:
                if entry is None:
                    # Workaround for a race in nats-py 2.16's KeyValue.watch: it can put its
                    # end-of-snapshot marker before the snapshot's entries when they were
                    # delivered but not yet handed over. With nothing seen and messages in
                    # the bucket, the end is the entry whose `delta` (pending) is 0.
                    if not snapshot.seen and await self._bucket_holds_messages():
                        continue
                    self._end_snapshot(snapshot)
                    continue
                self._on_heartbeat(entry.key, entry.value, entry.operation)
                if snapshot.loading:
                    snapshot.seen.add(entry.key)
                    if entry.delta == 0:
                        self._end_snapshot(snapshot)
        finally:
            with anyio.move_on_after(2, shield=True):
                try:
                    await watcher.stop()  # type: ignore[no-untyped-call]
                except NATS_ERRORS as exc:
                    logger.debug("workers watch stop failed error=%r", exc)

    async def _bucket_holds_messages(self) -> bool:
        info = await self._js().stream_info(f"KV_{WORKERS_BUCKET}")
        return bool(info.state.messages)

    def _end_snapshot(self, snapshot: _Snapshot) -> None:
        if not snapshot.loading:
            return
        snapshot.loading = False
        # A worker that expired unseen while we were away left no key and no marker behind.
        for worker_id in set(self.workers) - snapshot.seen:
            self._on_heartbeat(worker_id, None, "expired")
        self.loaded.set()

    def _on_heartbeat(self, worker_id: str, value: bytes | None, operation: str | None) -> None:
        if operation in ("DEL", "PURGE") or not value:
            gone = self.workers.pop(worker_id, None)
            if gone is not None:
                logger.warning(
                    "worker gone worker_id=%s reason=%s", worker_id, operation or "expired"
                )
        else:
            try:
                heartbeat = decode_heartbeat(value)
            except msgspec.DecodeError:
                logger.warning("undecodable heartbeat worker_id=%s", worker_id)
                return
            if worker_id not in self.workers:
                logger.info(
                    "worker joined worker_id=%s capabilities=%s",
                    worker_id,
                    ",".join(heartbeat.capabilities),
                )
            self.workers[worker_id] = heartbeat
        self.changed.set()
        self.changed = anyio.Event()


@dataclass
class _Snapshot:
    """The first look at the `workers` bucket of one watch, until its last entry."""

    loading: bool = True
    seen: set[str] = field(default_factory=set)
