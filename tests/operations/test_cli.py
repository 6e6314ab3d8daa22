"""`d8 status`, `d8 watch` and `d8 workers` as an operator runs them, and a worker's `/metrics`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from typing import TYPE_CHECKING

import anyio
import httpx
import pytest

from mesh.contract import Task
from tests.helpers import ROOT, WorkerProcess, orchestrator_for, poll_until

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.anyio


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def _d8(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NATS_URL": url}
    return await anyio.to_thread.run_sync(
        lambda: subprocess.run(
            [sys.executable, "-m", "mesh.cli", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=ROOT,
        )
    )


async def test_status_watch_and_workers_print_live_tables(nats_url: str, tmp_path: Path) -> None:
    metrics_port = _free_port()
    env = {"D8_METRICS_PORT": str(metrics_port)}
    async with orchestrator_for(nats_url) as orch:
        worker = WorkerProcess(
            nats_url, "--worker-id", "cli-pi", env=env, log_path=tmp_path / "w.log"
        )
        try:
            await poll_until(lambda: "cli-pi" in orch.workers, timeout_s=20, what="worker")
            await orch.submit_many(Task(id=f"p-{i}", prompt="x", model="parked") for i in range(5))
            _, done = await orch.run([Task(id="ran", prompt="x")], timeout_s=10)
            status = await _d8(nats_url, "status", "--sample-s", "0.2")
            watch = await _d8(nats_url, "watch", "--count", "2", "--interval-s", "0.2")
            workers = await _d8(nats_url, "workers")
            async with httpx.AsyncClient(timeout=5) as http:
                metrics = (await http.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
        finally:
            worker.stop()

    assert "ran" in done
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert any("cli-pi" in line and "ago" in line for line in lines), status.stdout
    parked = next(line for line in lines if "chat/parked" in line)
    # capability, workers, pending, in flight, redelivered, dead, done, rate
    cells = [cell.strip() for cell in parked.split("│")[1:-1]]
    assert cells[:6] == ["chat/parked", "0", "5", "0", "0", "0"], parked
    assert "1 live worker(s), 5 task(s) stored in TASKS, 0 dead letter(s)" in status.stdout
    assert watch.returncode == 0 and "chat/parked" in watch.stdout, watch.stderr
    # Piped, each redraw is printed in full as it is taken, not once at the end.
    assert watch.stdout.count("chat/parked") == 2, watch.stdout
    assert workers.returncode == 0 and "cli-pi" in workers.stdout and "last beat" in workers.stdout
    assert 'd8_worker_completed{backend="echo",worker_id="cli-pi"} 1.0' in metrics
    assert 'd8_worker_concurrency{backend="echo",worker_id="cli-pi"}' in metrics


async def test_status_on_a_bare_server_says_to_start_the_orchestrator(nats_url: str) -> None:
    done = await _d8(nats_url, "status")
    assert done.returncode == 2
    assert "start `d8 orchestrator`" in done.stderr and "Traceback" not in done.stderr
    workers = await _d8(nats_url, "workers")
    assert workers.returncode == 0 and "live workers (0)" in workers.stdout


async def test_a_worker_metrics_port_in_use_is_a_config_error(nats_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "NATS_URL": nats_url,
            "D8_METRICS_PORT": str(port),
        }
        done = await anyio.to_thread.run_sync(
            lambda: subprocess.run(
                [sys.executable, "-m", "mesh.cli", "worker"],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
                cwd=ROOT,
            )
        )
    assert done.returncode == 2
    assert f"D8_METRICS_PORT={port}: cannot listen on 127.0.0.1:{port}" in done.stderr


async def test_status_without_a_server_says_how_to_fix_it() -> None:
    done = await _d8("nats://127.0.0.1:1", "status")
    assert done.returncode == 2
    assert "cannot connect to NATS at nats://127.0.0.1:1" in done.stderr
