"""taskiq with taskiq-nats's pull-based JetStream broker, on the raw baseline's stream.

The worker is `taskiq worker --workers 1`: a supervisor process that forks one worker process,
which runs the tasks. Its broker comes from `worker_broker`, a factory that the taskiq CLI
calls, reading the server URL from `D8_BENCH_NATS_URL`. The no-op task reports its sequence
number on `bench.done` and returns; taskiq then acks it (the default `--ack-type when_saved`,
with no result backend). The producer kicks the task by name with `AsyncKicker.kiq`, which
publishes to JetStream and waits for the PubAck.

Settings: `pull_consume_batch=100` (the raw baseline's fetch size) and
`pull_consume_timeout=0.1`. With the broker's default timeout of None the worker does not stop
on SIGTERM.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig
from taskiq.kicker import AsyncKicker
from taskiq_nats import PullBasedJetStreamBroker

from bench.common import Child, payload
from bench.peers_common import TASK_NAME, NatsPeer, child_pids
from bench.raw import DONE, DURABLE, FETCH_BATCH, STREAM, SUBJECT

__all__ = ["SETTINGS", "TaskiqSystem", "make_broker", "worker_broker"]

URL_ENV = "D8_BENCH_NATS_URL"
FETCH_TIMEOUT_S = 0.1
SETTINGS = {
    "broker": "taskiq_nats.PullBasedJetStreamBroker",
    "pull_consume_batch": FETCH_BATCH,
    "pull_consume_timeout_s": FETCH_TIMEOUT_S,
    "worker": "taskiq worker --workers 1 --log-level WARNING",
    "ack": "taskiq default (when_saved), no result backend",
}


def make_broker(url: str) -> PullBasedJetStreamBroker:
    """The broker both sides use: the raw baseline's stream and durable consumer."""
    return PullBasedJetStreamBroker(
        servers=url,
        subject=SUBJECT,
        stream_name=STREAM,
        durable=DURABLE,
        stream_config=StreamConfig(
            name=STREAM,
            subjects=[SUBJECT],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
        ),
        consumer_config=ConsumerConfig(durable_name=DURABLE, ack_policy=AckPolicy.EXPLICIT),
        pull_consume_batch=FETCH_BATCH,
        pull_consume_timeout=FETCH_TIMEOUT_S,
    )


def worker_broker() -> PullBasedJetStreamBroker:
    """The worker's broker with the no-op task registered; called by `taskiq worker`."""
    broker = make_broker(os.environ[URL_ENV])

    async def noop(task: dict[str, Any]) -> None:
        await broker.client.publish(DONE, b"%d" % task["seq"])

    broker.register_task(noop, task_name=TASK_NAME)
    return broker


class TaskiqSystem(NatsPeer):
    """A taskiq producer in this process and one `taskiq worker` process."""

    name = "taskiq-nats"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.broker: PullBasedJetStreamBroker | None = None
        self._worker_pid: int | None = None

    async def _open_producer(self) -> None:
        self.broker = make_broker(self.url)
        await self.broker.startup()
        self._kicker: AsyncKicker[Any, Any] = AsyncKicker(
            task_name=TASK_NAME, broker=self.broker, labels={}
        )

    async def _close_producer(self) -> None:
        if self.broker is not None:
            await self.broker.shutdown()
            self.broker = None

    def _start_worker(self) -> Child:
        taskiq = Path(sys.executable).with_name("taskiq")
        return Child(
            [
                str(taskiq),
                "worker",
                f"{__name__}:worker_broker",
                "--workers",
                "1",
                "--log-level",
                "WARNING",
            ],
            name=self.name,
            env={URL_ENV: self.url},
        )

    async def _submit(self, seq: int) -> object:
        return await self._kicker.kiq(payload(seq))

    def worker_pids(self) -> list[int]:
        """The forked worker that runs the tasks, then its supervisor."""
        if self.worker is None:
            return []
        if self._worker_pid is None:
            # The ping has been run, so the fork exists; give a slow /proc a moment anyway.
            deadline = time.monotonic() + 5
            while not (children := child_pids(self.worker.pid)) and time.monotonic() < deadline:
                time.sleep(0.05)
            self._worker_pid = children[0] if children else None
        if self._worker_pid is None:
            return [self.worker.pid]
        return [self._worker_pid, self.worker.pid]
