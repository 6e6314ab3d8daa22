"""Celery with the Redis broker and `acks_late`, on a redis-server that this module starts.

The server is Debian's `redis-server`, started on a free loopback port with a temporary
directory and no persistence (no RDB, no AOF; JetStream's file store fsyncs only every two
minutes, so neither side syncs per task), and stopped by its PID afterwards. The worker is
`celery worker --pool solo` (one process, tasks run inline) with `task_acks_late=True`, the
default prefetch multiplier (4), no result backend, and gossip, mingle and heartbeat off. The
no-op task reports its sequence number with `RPUSH bench:done`; an observer task in this
process pops that list. Celery's producer (`send_task`, what `apply_async` calls) blocks, so
it runs in a thread, one task after the other.

Run as `python -m bench.peers_celery --url URL` it is the worker process.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Self

import redis
import redis.asyncio
from celery import Celery

from bench.common import Child, free_port, payload
from bench.peers_common import READY_SEQ, TASK_NAME, wait_ready

if TYPE_CHECKING:
    from collections.abc import Iterator

    from bench.common import Timeline

__all__ = ["SETTINGS", "CelerySystem", "RedisServer", "make_app", "redis_server", "server_binary"]

QUEUE = "bench"
DONE_KEY = "bench:done"
#: kombu's Redis transport keeps a message delivered but not yet acked in this hash.
UNACKED_KEY = "unacked"
SOCKET_TIMEOUT_S = 5.0
#: Longest a producer thread may run; far above Celery's ~1,200 tasks/s for the bench's sizes.
PRODUCE_LIMIT_S = 300.0
SETTINGS = {
    "broker": "redis (redis-server, no persistence)",
    "pool": "solo",
    "task_acks_late": True,
    "worker_prefetch_multiplier": 4,
    "result_backend": None,
    "producer": "send_task, blocking, one after the other (in a thread)",
}


def server_binary() -> str | None:
    """Path of `redis-server`, or None when it is not installed."""
    return shutil.which("redis-server")


class RedisServer:
    """A running redis-server: what `bench.runner.measure` reads of a server."""

    def __init__(self, child: Child, port: int) -> None:
        self.child = child
        self.pid: int | None = child.pid
        self.url = f"redis://127.0.0.1:{port}/0"
        self.monitor_url = ""


@contextmanager
def redis_server(ready_timeout_s: float = 10.0) -> Iterator[RedisServer]:
    """A fresh redis-server on a free loopback port, its files in a temporary directory."""
    binary = server_binary()
    if binary is None:
        raise RuntimeError("redis-server is not on PATH")
    with tempfile.TemporaryDirectory(prefix="d8-bench-redis-") as store:
        port = free_port()
        child = Child(
            [
                binary,
                "--bind",
                "127.0.0.1",
                "--port",
                str(port),
                "--dir",
                store,
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
            ],
            name="redis-server",
        )
        try:
            server = RedisServer(child, port)
            probe = redis.Redis.from_url(server.url, socket_timeout=1, socket_connect_timeout=1)
            deadline = time.monotonic() + ready_timeout_s
            while True:
                try:
                    probe.ping()
                    break
                except redis.ConnectionError:
                    if not child.alive() or time.monotonic() > deadline:
                        raise RuntimeError(f"redis-server did not answer: {child.tail()}") from None
                    time.sleep(0.05)
            probe.close()
            yield server
        finally:
            child.stop(5)


def make_app(url: str) -> Celery:
    """The Celery app both sides use."""
    app = Celery("d8-bench", broker=url)
    app.conf.update(
        task_acks_late=True,
        task_ignore_result=True,
        worker_prefetch_multiplier=4,
        task_default_queue=QUEUE,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "socket_timeout": SOCKET_TIMEOUT_S,
            "socket_connect_timeout": SOCKET_TIMEOUT_S,
        },
        worker_send_task_events=False,
        task_send_sent_event=False,
        worker_hijack_root_logger=False,
    )
    return app


def _run_worker(url: str) -> None:
    app = make_app(url)
    done = redis.Redis.from_url(url, socket_timeout=SOCKET_TIMEOUT_S)

    @app.task(name=TASK_NAME)
    def noop(task: dict[str, Any]) -> None:
        done.rpush(DONE_KEY, task["seq"])

    app.worker_main(
        [
            "worker",
            "--pool=solo",
            "--loglevel=WARNING",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            f"--queues={QUEUE}",
        ]
    )


class CelerySystem:
    """A Celery producer and completion observer in this process, one solo worker process."""

    name = "celery-redis"

    def __init__(self, url: str) -> None:
        self.url = url
        self.worker: Child | None = None
        self._timeline: Timeline | None = None
        self._offset = 0
        self._ready = asyncio.Event()
        self._stopping = False

    async def __aenter__(self) -> Self:
        self.app = make_app(self.url)
        self.client = redis.asyncio.Redis.from_url(self.url, socket_timeout=SOCKET_TIMEOUT_S)
        # Owned here and awaited in __aexit__, so an observer failure surfaces there.
        self._observer = asyncio.create_task(self._observe())
        started = False
        try:
            self.worker = Child(
                [sys.executable, "-m", "bench.peers_celery", "--url", self.url], name=self.name
            )
            await asyncio.to_thread(self._send, READY_SEQ)
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
        self._stopping = True
        try:
            await asyncio.wait_for(self._observer, SOCKET_TIMEOUT_S * 2)
        finally:
            await self.client.aclose()
            self.app.close()

    async def _observe(self) -> None:
        """Pop finished sequence numbers until the system closes (each wait is 0.5 s)."""
        while not self._stopping:
            first = await self.client.blpop([DONE_KEY], timeout=0.5)
            if first is None:
                continue
            at = time.perf_counter()
            rest = await self.client.lpop(DONE_KEY, 10_000) or []
            for raw in (first[1], *rest):
                seq = int(raw)
                if seq == READY_SEQ:
                    self._ready.set()
                elif self._timeline is not None:
                    self._timeline.finish(seq - self._offset, at)

    def worker_pids(self) -> list[int]:
        return [self.worker.pid] if self.worker else []

    def _send(self, seq: int) -> None:
        self.app.send_task(TASK_NAME, args=(payload(seq),), queue=QUEUE)

    def _produce(self, timeline: Timeline, offset: int, rate: float | None) -> float:
        t0 = time.perf_counter()
        send = self.app.send_task
        for seq in range(timeline.n):
            now = time.perf_counter()
            if now - t0 > PRODUCE_LIMIT_S:
                raise TimeoutError(f"celery producer still sending after {PRODUCE_LIMIT_S} s")
            if rate:
                delay = t0 + seq / rate - now
                if delay > 0:
                    time.sleep(delay)
            timeline.enqueued[seq] = time.perf_counter()
            send(TASK_NAME, args=(payload(offset + seq),), queue=QUEUE)
        return t0

    async def run(self, timeline: Timeline, offset: int, rate: float | None) -> float:
        """Enqueue `timeline.n` tasks (all at once, or at `rate` per second); return t0."""
        self._timeline, self._offset = timeline, offset
        return await asyncio.to_thread(self._produce, timeline, offset, rate)

    async def drained(self) -> bool:
        """Whether the queue is empty and no delivered task is waiting for its ack."""
        waiting = await self.client.llen(QUEUE)
        unacked = await self.client.hlen(UNACKED_KEY)
        return waiting == 0 and unacked == 0


def main() -> None:
    parser = argparse.ArgumentParser(description="Celery worker for the peers bench")
    parser.add_argument("--url", required=True)
    args = parser.parse_args()
    _run_worker(args.url)


if __name__ == "__main__":
    main()
