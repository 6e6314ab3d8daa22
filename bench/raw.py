"""The baseline: plain nats-py JetStream, no framework, on the same server settings as the mesh.

A work-queue stream with file storage and one durable pull consumer with explicit acks. The
worker process fetches up to 100 messages at a time, decodes each task, acks it, and reports
its sequence number on a core subject, which the producer (this process) observes. It does
not store a result: that is the mesh's extra work.

Run as `python -m bench.raw --url URL` it is the worker process.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import TYPE_CHECKING

import msgspec
import nats
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig

from bench.common import Child, Timeline, payload

if TYPE_CHECKING:
    from nats.aio.msg import Msg
    from nats.js import JetStreamContext

__all__ = ["RawSystem", "work_queue_stream"]

STREAM = "BENCH"
SUBJECT = "bench.tasks"
DONE = "bench.done"
DURABLE = "bench-worker"


def work_queue_stream() -> StreamConfig:
    """The baseline's stream; the peers that speak JetStream declare the same one."""
    return StreamConfig(
        name=STREAM,
        subjects=[SUBJECT],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
    )


FETCH_BATCH = 100


async def _worker(url: str, batch: int) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    sub = await js.pull_subscribe_bind(durable=DURABLE, stream=STREAM)
    decode = msgspec.json.decode
    await nc.publish(DONE, b"ready")
    while True:
        try:
            messages = await sub.fetch(batch=batch, timeout=5)
        except TimeoutError:
            continue
        for message in messages:
            seq = decode(message.data)["seq"]
            await message.ack()
            await nc.publish(DONE, b"%d" % seq)


class RawSystem:
    """Producer and observer of the raw baseline, driving one worker process."""

    name = "raw-jetstream"

    def __init__(self, url: str) -> None:
        self.url = url
        self.worker: Child | None = None
        self._timeline: Timeline | None = None
        self._offset = 0
        self._ready = asyncio.Event()
        self._encode = msgspec.json.encode

    async def __aenter__(self) -> RawSystem:
        self.nc = await nats.connect(self.url)
        self.js: JetStreamContext = self.nc.jetstream()
        await self.js.add_stream(work_queue_stream())
        await self.js.add_consumer(
            STREAM, ConsumerConfig(durable_name=DURABLE, ack_policy=AckPolicy.EXPLICIT)
        )
        await self.nc.subscribe(
            DONE, cb=self._on_done, pending_msgs_limit=-1, pending_bytes_limit=-1
        )
        self.worker = Child([sys.executable, "-m", "bench.raw", "--url", self.url], name=self.name)
        await asyncio.wait_for(self._ready.wait(), 30)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.worker is not None:
            self.worker.stop()
        await self.nc.close()

    def worker_pids(self) -> list[int]:
        return [self.worker.pid] if self.worker else []

    async def _on_done(self, msg: Msg) -> None:
        if msg.data == b"ready":
            self._ready.set()
            return
        if self._timeline is not None:
            self._timeline.finish(int(msg.data) - self._offset, time.perf_counter())

    async def run(self, timeline: Timeline, offset: int, rate: float | None) -> float:
        """Enqueue `timeline.n` tasks (all at once, or at `rate` per second); return t0."""
        self._timeline, self._offset = timeline, offset
        publish = self.js.publish_async
        encode = self._encode
        futures = []
        t0 = time.perf_counter()
        for seq in range(timeline.n):
            if rate:
                delay = t0 + seq / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            timeline.enqueued[seq] = time.perf_counter()
            futures.append(await publish(SUBJECT, encode(payload(offset + seq))))
        for future in futures:
            await future
        return t0

    async def drained(self) -> bool:
        """Whether the server holds no unacked task (a work queue deletes on ack)."""
        return (await self.js.stream_info(STREAM)).state.messages == 0


def main() -> None:
    parser = argparse.ArgumentParser(description="raw nats-py JetStream worker for the bench")
    parser.add_argument("--url", required=True)
    parser.add_argument("--batch", type=int, default=FETCH_BATCH)
    args = parser.parse_args()
    asyncio.run(_worker(args.url, args.batch))


if __name__ == "__main__":
    main()
