"""What the peer drivers share: the submit window, the NATS-side producer and observer, PIDs.

Every NATS peer runs on the raw baseline's stream and subjects (`bench.raw`): a work-queue
stream `BENCH` with file storage, tasks on `bench.tasks`, and the worker reports each finished
task's sequence number on the core subject `bench.done`, which this process observes. A task
with sequence number `READY_SEQ` is the ping that proves the worker is up before measuring.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import TYPE_CHECKING, Self

import nats

from bench.raw import DONE, STREAM, work_queue_stream

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from nats.aio.msg import Msg

    from bench.common import Child, Timeline

__all__ = [
    "READY_SEQ",
    "READY_TIMEOUT_S",
    "SUBMIT_WINDOW",
    "TASK_NAME",
    "NatsPeer",
    "child_pids",
    "submit_all",
    "wait_ready",
]

#: Sequence number of the ping task that proves the worker is up.
READY_SEQ = -1
#: How long a worker may take from its start to finishing the ping task.
READY_TIMEOUT_S = 60.0
#: Enqueue calls in flight at once for a producer whose enqueue waits for the server's ack;
#: the raw baseline keeps every PubAck outstanding, so a peer gets a deep window too.
SUBMIT_WINDOW = 256
#: The no-op task's registered name in the frameworks that route by name.
TASK_NAME = "bench.noop"


def child_pids(pid: int) -> list[int]:
    """The direct children of process `pid` (Linux `/proc/PID/task/*/children`)."""
    found: list[int] = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found.extend(int(p) for p in children.read_text().split())
        except OSError:
            continue
    return found


async def wait_ready(ready: asyncio.Event, worker: Child) -> None:
    """Wait until the worker has run the ping task, at most `READY_TIMEOUT_S`."""
    try:
        await asyncio.wait_for(ready.wait(), READY_TIMEOUT_S)
    except TimeoutError:
        state = "running" if worker.alive() else "exited"
        raise RuntimeError(
            f"worker ({state}) did not run the ping task within {READY_TIMEOUT_S:.0f} s; "
            f"log {worker.log_path}: {worker.tail(3)!r}"
        ) from None


async def submit_all(
    timeline: Timeline,
    offset: int,
    rate: float | None,
    submit: Callable[[int], Awaitable[object]],
    window: int = SUBMIT_WINDOW,
) -> float:
    """Enqueue `timeline.n` tasks with `submit(seq)`, up to `window` at once; return t0.

    Without `rate` tasks go out as fast as the window allows; with it, on an absolute
    schedule of `rate` per second. Each task's enqueue time is stamped just before its call.
    """
    slots = asyncio.Semaphore(window)

    async def one(seq: int) -> None:
        try:
            await submit(offset + seq)
        finally:
            slots.release()

    t0 = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for seq in range(timeline.n):
            if rate:
                delay = t0 + seq / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            await slots.acquire()
            timeline.enqueued[seq] = time.perf_counter()
            group.create_task(one(seq))
    return t0


class NatsPeer:
    """Producer and observer of a NATS peer; a subclass opens its client and starts its worker.

    Subclasses set `name` and implement `_open_producer`, `_close_producer`, `_start_worker`
    and `_submit`.
    """

    name = "nats-peer"

    def __init__(self, url: str) -> None:
        self.url = url
        self.worker: Child | None = None
        self._timeline: Timeline | None = None
        self._offset = 0
        self._ready = asyncio.Event()

    async def _open_producer(self) -> None:
        raise NotImplementedError

    async def _close_producer(self) -> None:
        raise NotImplementedError

    def _start_worker(self) -> Child:
        raise NotImplementedError

    async def _submit(self, seq: int) -> object:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        self.nc = await nats.connect(self.url)
        self.js = self.nc.jetstream()
        # The stream exists before the ping is published; each framework then declares the
        # same stream itself (an identical config is accepted) and its own consumer.
        await self.js.add_stream(work_queue_stream())
        await self.nc.subscribe(
            DONE, cb=self._on_done, pending_msgs_limit=-1, pending_bytes_limit=-1
        )
        started = False
        try:
            await self._open_producer()
            self.worker = self._start_worker()
            await asyncio.wait_for(self._submit(READY_SEQ), 10)
            await wait_ready(self._ready, self.worker)
            started = True
        finally:
            if not started:
                await self.__aexit__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.worker is not None:
            self.worker.stop()
            self.worker = None
        try:
            await asyncio.wait_for(self._close_producer(), 10)
        finally:
            await self.nc.close()

    def worker_pids(self) -> list[int]:
        """The worker process first (the one that runs tasks), then any supervisor."""
        return [self.worker.pid] if self.worker else []

    async def _on_done(self, msg: Msg) -> None:
        seq = int(msg.data)
        if seq == READY_SEQ:
            self._ready.set()
        elif self._timeline is not None:
            self._timeline.finish(seq - self._offset, time.perf_counter())

    async def run(self, timeline: Timeline, offset: int, rate: float | None) -> float:
        """Enqueue `timeline.n` tasks (all at once, or at `rate` per second); return t0."""
        self._timeline, self._offset = timeline, offset
        return await submit_all(timeline, offset, rate, self._submit)

    async def drained(self) -> bool:
        """Whether the server holds no unacked task (a work queue deletes on ack)."""
        return (await self.js.stream_info(STREAM)).state.messages == 0
