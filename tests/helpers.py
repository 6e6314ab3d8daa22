"""Shared test helpers: real servers, running workers, and waiting without sleeping."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import httpx

from mesh.connection import ConnectionSettings
from mesh.topology import TopologySettings
from orchestrator.core import Orchestrator, OrchestratorSettings
from workers.runtime import Worker, WorkerSettings

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

__all__ = [
    "ROOT",
    "WorkerProcess",
    "orchestrator_for",
    "poll_until",
    "running_worker",
    "worker_settings",
]

ROOT = Path(__file__).resolve().parent.parent


async def poll_until(
    check: Callable[[], Awaitable[Any]] | Callable[[], Any],
    *,
    timeout_s: float = 10.0,
    interval_s: float = 0.02,
    what: str = "condition",
) -> Any:
    """Call `check` until it returns something truthy; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if hasattr(value, "__await__"):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await anyio.sleep(interval_s)


async def health_answers(http: httpx.AsyncClient) -> bool:
    """Whether the HTTP API at `http`'s base URL answers `/health` with 200 yet."""
    try:
        return (await http.get("/health")).status_code == 200
    except httpx.TransportError:
        return False


def worker_settings(url: str, **overrides: Any) -> WorkerSettings:
    """Worker settings for tests: short heartbeats, a quick grace period."""
    topology = overrides.pop("topology", TopologySettings(heartbeat_interval_s=1.0))
    fields: dict[str, Any] = {
        "connection": ConnectionSettings(servers=(url,), name="test-worker"),
        "topology": topology,
        "grace_s": 5.0,
    }
    fields.update(overrides)
    return WorkerSettings(**fields)


@asynccontextmanager
async def running_worker(settings: WorkerSettings, **kwargs: Any) -> AsyncIterator[Worker]:
    """A worker serving in this process until the block ends."""
    worker = Worker(settings, **kwargs)
    async with anyio.create_task_group() as group:
        group.start_soon(worker.run)
        with anyio.fail_after(10):
            await worker.ready.wait()
        try:
            yield worker
        finally:
            worker.stop()


@asynccontextmanager
async def orchestrator_for(url: str, **overrides: Any) -> AsyncIterator[Orchestrator]:
    topology = overrides.pop("topology", TopologySettings(heartbeat_interval_s=1.0))
    settings = OrchestratorSettings(
        connection=ConnectionSettings(servers=(url,), name="test-orchestrator"),
        topology=topology,
        **overrides,
    )
    async with Orchestrator(settings) as orchestrator:
        yield orchestrator


class WorkerProcess:
    """A real `d8 worker` process, for behaviour that crosses processes (kills, signals)."""

    def __init__(
        self, url: str, *args: str, env: dict[str, str] | None = None, log_path: Path | None = None
    ) -> None:
        command = [sys.executable, "-m", "mesh.cli", "worker", *args]
        full_env = {**os.environ, "NATS_URL": url, "PYTHONPATH": str(ROOT), **(env or {})}
        self.log_path = log_path
        self._log = open(log_path, "wb") if log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(
            command, env=full_env, stdout=self._log, stderr=self._log, cwd=ROOT
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def stop(self, timeout_s: float = 15.0) -> int:
        if self.process.poll() is None:
            self.process.terminate()
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(timeout_s)
        finally:
            if self._log is not subprocess.DEVNULL:
                self._log.close()
