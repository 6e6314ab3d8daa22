"""The mesh's full path, driven through its public API.

The producer is an `Orchestrator` in this process: it submits each task with its id as the
dedup id (`Nats-Msg-Id`), and a task counts as done when its result, written by the worker
to the `results` bucket, reaches the orchestrator's result subscription. The workers are
real `d8 worker --backend echo` processes.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from bench.common import Child, Timeline, payload
from mesh.connection import ConnectionSettings
from mesh.contract import Task
from mesh.topology import TASKS_STREAM, TopologySettings
from orchestrator.core import Orchestrator, OrchestratorSettings

if TYPE_CHECKING:
    from mesh.contract import Result

__all__ = ["MeshSystem", "echo_task"]


def echo_task(run: str, seq: int) -> Task:
    """A no-op task for the echo backend carrying the ~200-byte payload as its metadata."""
    return Task(id=f"{run}-{seq}", prompt="noop", metadata=payload(seq))


class MeshSystem:
    """An orchestrator plus `workers` echo worker processes on one server."""

    name = "d8-mesh"

    def __init__(
        self,
        url: str,
        *,
        workers: int = 1,
        concurrency: int | None = None,
        log_level: str = "warning",
        worker_args: tuple[str, ...] = ("--backend", "echo"),
        env: dict[str, str] | None = None,
    ) -> None:
        self.url = url
        self.n_workers = workers
        self.concurrency = concurrency
        self.log_level = log_level
        self.worker_args = worker_args
        self.env = env or {}
        self.workers: list[Child] = []
        self._timeline: Timeline | None = None
        self._run = "w"
        self._base = 0

    async def __aenter__(self) -> MeshSystem:
        settings = OrchestratorSettings(
            connection=ConnectionSettings(servers=(self.url,), name="bench-orchestrator"),
            topology=TopologySettings(heartbeat_interval_s=1.0),
        )
        self.orch = Orchestrator(settings)
        await self.orch.__aenter__()
        args = ["--log-level", self.log_level, "worker", *self.worker_args]
        if self.concurrency:
            args += ["--concurrency", str(self.concurrency)]
        env = {"NATS_URL": self.url, "D8_HEARTBEAT_S": "1", **self.env}
        self.workers = [
            Child.d8(*args, name=f"mesh-worker-{i}", env=env) for i in range(self.n_workers)
        ]
        deadline = time.monotonic() + 60
        while len(self.orch.workers) < self.n_workers:
            dead = [w for w in self.workers if not w.alive()]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(
                    f"mesh workers did not come up: {dead[0].tail() if dead else ''}"
                )
            await asyncio.sleep(0.02)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for worker in self.workers:
            worker.stop()
        await self.orch.__aexit__(None, None, None)

    def worker_pids(self) -> list[int]:
        return [w.pid for w in self.workers]

    def _on_result(self, result: Result) -> None:
        if self._timeline is not None and result.status == "ok":
            seq = int(result.id.rsplit("-", 1)[1]) - self._base
            self._timeline.finish(seq, time.perf_counter())

    async def run(self, timeline: Timeline, offset: int, rate: float | None) -> float:
        """Submit `timeline.n` tasks (all at once, or at `rate` per second); return t0."""
        self._timeline, self._base = timeline, offset
        timeout_s = 60 + timeline.n / 200
        if not rate:
            t0 = time.perf_counter()
            for seq in range(timeline.n):
                timeline.enqueued[seq] = t0
            tasks = [echo_task(self._run, offset + seq) for seq in range(timeline.n)]
            await self.orch.run(tasks, timeout_s, on_result=self._on_result)
            return t0
        pending = []
        t0 = time.perf_counter()
        for seq in range(timeline.n):
            delay = t0 + seq / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            timeline.enqueued[seq] = time.perf_counter()
            task = echo_task(self._run, offset + seq)
            pending.append(
                asyncio.ensure_future(self.orch.run([task], 30, on_result=self._on_result))
            )
        await asyncio.gather(*pending)
        return t0

    async def drained(self) -> bool:
        """Whether the server holds no unacked task (a work queue deletes on ack)."""
        return (await self.orch.js.stream_info(TASKS_STREAM)).state.messages == 0
