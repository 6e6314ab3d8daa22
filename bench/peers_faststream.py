"""FastStream's NATS broker with a JetStream pull subscriber, on the raw baseline's stream.

The worker process is a FastStream app (`app.run()`, what `faststream run` calls) whose one
subscriber is a durable pull consumer, `PullSub(batch_size=100, timeout=0.1)`, with
`AckPolicy.ACK`: FastStream acks each message after the handler returns. The handler reports
the task's sequence number on `bench.done` over the broker's NATS connection. There is no
per-message log line: the broker logs them at DEBUG (`log_level=`), below its logger's INFO.
The producer is `NatsBroker.publish(..., stream="BENCH")`, which waits for the PubAck.

Run as `python -m bench.peers_faststream --url URL` it is the worker process.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

from faststream import AckPolicy, FastStream
from faststream.nats import JStream, NatsBroker, PullSub
from nats.js.api import RetentionPolicy, StorageType

from bench.common import Child, payload
from bench.peers_common import NatsPeer
from bench.raw import DONE, DURABLE, FETCH_BATCH, STREAM, SUBJECT

__all__ = ["SETTINGS", "FastStreamSystem"]

FETCH_TIMEOUT_S = 0.1
SETTINGS = {
    "subscriber": "NatsBroker.subscriber(pull_sub=PullSub(...), durable=...)",
    "batch_size": FETCH_BATCH,
    "timeout_s": FETCH_TIMEOUT_S,
    "ack_policy": "AckPolicy.ACK",
    "worker": "FastStream(broker).run(), per-message log lines at DEBUG (not written)",
}


def _worker_app(url: str) -> FastStream:
    # Not `faststream run --log-level warning`: that also moves the per-message lines up to
    # WARNING (`broker.config.logger.set_level` sets both levels), so they are still written.
    broker = NatsBroker(url, log_level=logging.DEBUG)
    stream = JStream(
        name=STREAM,
        subjects=[SUBJECT],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
    )

    @broker.subscriber(
        SUBJECT,
        stream=stream,
        durable=DURABLE,
        pull_sub=PullSub(batch_size=FETCH_BATCH, timeout=FETCH_TIMEOUT_S),
        ack_policy=AckPolicy.ACK,
        no_reply=True,
    )
    async def noop(task: dict[str, Any]) -> None:
        await broker.connection.publish(DONE, b"%d" % task["seq"])

    return FastStream(broker)


class FastStreamSystem(NatsPeer):
    """A FastStream producer in this process and one FastStream app process."""

    name = "faststream-nats"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.broker: NatsBroker | None = None

    async def _open_producer(self) -> None:
        self.broker = NatsBroker(self.url)
        await self.broker.connect()

    async def _close_producer(self) -> None:
        if self.broker is not None:
            await self.broker.stop()
            self.broker = None

    def _start_worker(self) -> Child:
        return Child(
            [sys.executable, "-m", "bench.peers_faststream", "--url", self.url], name=self.name
        )

    async def _submit(self, seq: int) -> object:
        assert self.broker is not None
        return await self.broker.publish(payload(seq), SUBJECT, stream=STREAM)


def main() -> None:
    parser = argparse.ArgumentParser(description="FastStream worker for the peers bench")
    parser.add_argument("--url", required=True)
    args = parser.parse_args()
    asyncio.run(_worker_app(args.url).run())


if __name__ == "__main__":
    main()
