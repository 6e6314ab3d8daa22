"""Submit a burst of tasks through an `Orchestrator` in its own process and report its memory.

`python -m tests.faults.burst_client NATS_URL COUNT` prints one JSON line: resident memory
(MB) before and at the peak, and how many results came back. Run by the burst test, so the
orchestrator's memory is measured apart from pytest's.
"""

from __future__ import annotations

import json
import sys
import time

import anyio

from mesh.connection import ConnectionSettings
from mesh.contract import Task
from orchestrator.core import Orchestrator, OrchestratorSettings
from tests.faults.helpers import fault_topology


def _memory_mb() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process in MB."""
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024
    return round(fields["VmRSS"], 1), round(fields["VmHWM"], 1)


async def _burst(url: str, count: int) -> dict[str, float]:
    settings = OrchestratorSettings(
        topology=fault_topology(ack_wait_s=10.0),
        connection=ConnectionSettings(servers=(url,), name="burst"),
        watch_workers=False,
    )
    tasks = [Task(id=f"burst-{i:05d}", prompt=f"task number {i}") for i in range(count)]
    async with Orchestrator(settings) as orch:
        before, _ = _memory_mb()
        started = time.monotonic()
        _, results = await orch.run(tasks, timeout_s=180)
        elapsed = time.monotonic() - started
        after, peak = _memory_mb()
    return {
        "rss_before_mb": before,
        "rss_after_mb": after,
        "peak_mb": peak,
        "results": len(results),
        "seconds": round(elapsed, 1),
    }


def main() -> None:
    url, count = sys.argv[1], int(sys.argv[2])
    print(json.dumps(anyio.run(_burst, url, count)))


if __name__ == "__main__":
    main()
