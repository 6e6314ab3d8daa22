"""Where the mesh's CPU goes: py-spy samples of an echo worker and of the producer.

`python -m bench --sections profile` runs a mesh throughput run with `py-spy record` attached
to the worker process and to this process (the orchestrator), keeps the raw stacks under
`bench/results/`, and reports each function's share of the samples (inclusive), for the
functions of the mesh, nats-py, anyio and asyncio that matter most.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from typing import TYPE_CHECKING, Any

from bench.common import ROOT, Timeline, fresh_server
from bench.meshrun import MeshSystem
from bench.runner import wait_count

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["profile_mesh", "summarise"]

_KEEP = ("mesh/", "workers/", "orchestrator/", "nats/", "anyio/", "asyncio/", "msgspec")
_RATE_HZ = 250


def _frame(raw: str) -> str:
    name, _, where = raw.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", str(ROOT) + "/", "python3.11/"):
        if marker in where:
            where = where.split(marker, 1)[1]
    return f"{name} ({where})"


def summarise(stacks: Path, top: int = 25) -> dict[str, Any]:
    """Share of busy samples per function, callees included, from py-spy's raw output.

    A busy sample is one inside an event-loop callback (`Handle._run`); samples waiting in
    `epoll` and helper threads are left out, so the shares add up to the process's work.
    """
    inclusive: Counter[str] = Counter()
    busy = 0
    for line in stacks.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if "Handle._run" not in stack or not count.isdigit():
            continue
        busy += int(count)
        for frame in {_frame(f) for f in stack.split(";")}:
            inclusive[frame] += int(count)
    shown = [
        (frame, count)
        for frame, count in inclusive.most_common()
        if any(k in frame for k in _KEEP) and count < busy
    ]
    return {
        "busy_samples": busy,
        "inclusive_pct": {f: round(100 * c / busy, 1) for f, c in shown[:top]} if busy else {},
    }


def _record(spy: str, pid: int, path: Path) -> subprocess.Popen[bytes]:
    command = [spy, "record", "-p", str(pid), "-r", str(_RATE_HZ), "-f", "raw", "-o", str(path)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _make_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)


async def profile_mesh(n: int, out_dir: Path) -> dict[str, Any]:
    """Profile one mesh throughput run of `n` tasks; skipped when py-spy cannot attach."""
    spy = shutil.which("py-spy", path=os.path.dirname(sys.executable)) or shutil.which("py-spy")
    if spy is None:
        return {"skipped": "py-spy is not installed (extra `bench`)"}
    _make_dir(out_dir)
    files = {"worker": out_dir / "profile-worker.txt", "producer": out_dir / "profile-producer.txt"}
    with fresh_server() as server:
        async with MeshSystem(server.url) as system:
            warm = Timeline(500)
            await system.run(warm, 0, None)
            await wait_count(warm, 60)
            pids = {"worker": system.workers[0].pid, "producer": os.getpid()}
            spies = [_record(spy, pids[role], files[role]) for role in files]
            await asyncio.sleep(1.0)  # py-spy attaches
            timeline = Timeline(n)
            t0 = await system.run(timeline, 500, None)
            await wait_count(timeline, 120)
            for process in spies:
                process.send_signal(signal.SIGINT)
            for process in spies:
                process.wait(30)
    if not all(path.exists() for path in files.values()):
        return {"skipped": "py-spy could not attach (it needs ptrace rights)"}
    out: dict[str, Any] = {"n": n, "tasks_per_s_while_sampled": timeline.summary(t0)["tasks_per_s"]}
    for role, path in files.items():
        out[role] = summarise(path) | {"stacks": str(path)}
    return out
