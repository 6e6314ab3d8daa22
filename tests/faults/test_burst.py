"""A burst of 10,000 tasks onto a stalled worker: memory stays bounded on both sides."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import TYPE_CHECKING

import anyio

from mesh.contract import Task
from mesh.topology import TASKS_STREAM
from tests.faults.helpers import consumer_info, fault_topology, start_worker
from tests.faults.ledger import read_ledger
from tests.helpers import ROOT, orchestrator_for, poll_until

if TYPE_CHECKING:
    from pathlib import Path

    from orchestrator.core import Orchestrator

BURST = 10_000
WARM_UP = 500
CONCURRENCY = 64
# Bounds, generous for a shared 2-core machine; measured: worker +0.3 MB, orchestrator
# about +17 MB for 10,000 tasks (it keeps every result it was asked to wait for).
WORKER_GROWTH_MB = 25.0
ORCHESTRATOR_GROWTH_MB = 80.0


def _memory_mb(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak) of a live process, in MB."""
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024
    return fields


async def _queued(orch: Orchestrator, count: int) -> bool:
    return (await orch.js.stream_info(TASKS_STREAM)).state.messages >= count


async def test_a_burst_of_10000_tasks_keeps_memory_bounded(nats_url: str, tmp_path: Path) -> None:
    topology = fault_topology(ack_wait_s=30.0)
    async with orchestrator_for(nats_url, topology=topology) as orch:
        worker = await start_worker(
            orch,
            nats_url,
            "steady",
            tmp_path,
            topology,
            "--concurrency",
            str(CONCURRENCY),
            env={"D8_LOG_LEVEL": "warning"},
        )
        burst = None
        try:
            warm_up = [Task(id=f"warm-{i:03d}", prompt="x") for i in range(WARM_UP)]
            _, warmed = await orch.run(warm_up, timeout_s=60)
            assert len(warmed) == WARM_UP
            settled = _memory_mb(worker.pid)["VmRSS"]

            # The worker stalls (a Pi swapping) while the whole burst arrives.
            worker.process.send_signal(signal.SIGSTOP)
            burst = subprocess.Popen(  # noqa: ASYNC220 - Popen only starts it
                [sys.executable, "-m", "tests.faults.burst_client", nats_url, str(BURST)],
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            await poll_until(
                lambda: _queued(orch, BURST - CONCURRENCY), timeout_s=60, what="the burst"
            )
            # Only what the worker asked for went to it; the rest waits in the stream.
            held = (await consumer_info(orch)).num_ack_pending
            worker.process.send_signal(signal.SIGCONT)

            out, err = await anyio.to_thread.run_sync(burst.communicate, None, 180)
            peak = _memory_mb(worker.pid)["VmHWM"]
        finally:
            worker.process.send_signal(signal.SIGCONT)
            if burst is not None and burst.poll() is None:
                burst.kill()
                burst.communicate()
            code = worker.stop()
        ids = [t.id for t in warm_up] + [f"burst-{i:05d}" for i in range(BURST)]
        ledger = await read_ledger(orch.js, ids, [])

    assert (code, burst.returncode) == (0, 0), err
    report = json.loads(out)
    print(
        f"burst: worker rss {settled:.1f} MB -> peak {peak:.1f} MB; orchestrator rss "
        f"{report['rss_before_mb']} MB -> peak {report['peak_mb']} MB; {report['results']} "
        f"results in {report['seconds']} s; held by the stalled worker: {held}; {ledger.summary()}"
    )
    assert held <= CONCURRENCY
    assert peak - settled < WORKER_GROWTH_MB
    assert report["peak_mb"] - report["rss_before_mb"] < ORCHESTRATOR_GROWTH_MB
    assert report["results"] == BURST
    ledger.check()
