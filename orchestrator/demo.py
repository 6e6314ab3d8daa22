"""`d8 demo`: a fresh mesh runs the example D8 workload and reports what happened."""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from mesh.connection import redact_url
from mesh.errors import ConfigError, MeshError

if TYPE_CHECKING:
    from mesh.contract import Result, Task
from orchestrator.client import (
    console,
    load_tasks,
    results_table,
    run_with_progress,
)
from orchestrator.core import Orchestrator
from orchestrator.launch import mesh_running, orchestrator_settings, run_unless_workers_exit

__all__ = ["DEFAULT_WORKLOAD", "run_demo"]

DEFAULT_WORKLOAD = Path("examples/d8-workload.jsonl")
WORKERS_READY_TIMEOUT_S = 30.0

NATS_CLI_HINTS = """\
The demo's server is gone with it. While a mesh runs (`d8 up`, which prints its NATS_URL),
look inside with the standard `nats` CLI (--server <that url>):
  nats stream info TASKS          the work queue (empty once every task is acked)
  nats consumer ls TASKS          one durable consumer per capability
  nats kv ls results              one result per task id
  nats kv get results {task_id}   one result
  nats kv ls workers              live workers (gone after their TTL)
  nats stream info DEAD           dead letters, with the reason in headers"""


async def _wait_for_workers(orchestrator: Orchestrator, count: int) -> None:
    if not await orchestrator.view.wait_for(count, WORKERS_READY_TIMEOUT_S):
        raise MeshError(
            f"only {len(orchestrator.workers)} of {count} workers were live after "
            f"{WORKERS_READY_TIMEOUT_S:.0f}s; their log lines above say why"
        )


async def run_demo(
    file: str | None,
    *,
    workers: int,
    backend: str | None,
    timeout_s: float,
    model: str | None = None,
) -> int:
    """Start a mesh, run the workload, print a table and `N/N tasks ok`; 0 when all ran ok."""
    path = Path(file) if file else DEFAULT_WORKLOAD
    if not path.is_file():
        raise ConfigError(
            f"workload {path} not found: run from the repository root or pass a JSONL file"
        )
    run_id = uuid.uuid4().hex[:6]
    # A fresh id per run, so re-running within the duplicate window runs the tasks again.
    tasks = [msgspec.structs.replace(t, id=f"{run_id}-{t.id}") for t in load_tasks(str(path))]

    # A store of its own: the demo neither sees nor disturbs a `d8 up` on this machine.
    store = tempfile.mkdtemp(prefix="d8-demo-")
    try:
        return await _run(
            tasks, store, workers=workers, backend=backend, model=model, timeout_s=timeout_s
        )
    finally:
        shutil.rmtree(store, ignore_errors=True)


async def _run(
    tasks: list[Task],
    store: str,
    *,
    workers: int,
    backend: str | None,
    model: str | None,
    timeout_s: float,
) -> int:
    running = mesh_running(workers=workers, backend=backend, model=model, store_dir=store)
    async with running as mesh:
        async with Orchestrator(orchestrator_settings(mesh.connection)) as orchestrator:
            url = redact_url(mesh.connection.servers[0])
            console.print(f"mesh up: NATS {url}, starting {workers} {mesh.backend} workers")

            async def wait_and_run() -> tuple[dict[str, Result], float]:
                await _wait_for_workers(orchestrator, workers)
                started = time.perf_counter()
                results = await run_with_progress(orchestrator, tasks, timeout_s)
                return results, time.perf_counter() - started

            # Workers that all exit (no model, no API key) end the demo at once.
            results, elapsed_s = await run_unless_workers_exit(mesh, wait_and_run)
            console.print(results_table(tasks, results))
            rss = [hb.rss_mb for hb in orchestrator.workers.values()]

    per_worker = Counter(r.worker_id for r in results.values())
    for worker_id, count in sorted(per_worker.items()):
        console.print(f"worker {worker_id} ran {count} tasks")

    ok = sum(1 for r in results.values() if r.status == "ok")
    console.print(
        f"{len(tasks)} tasks in {elapsed_s:.2f}s ({len(tasks) / elapsed_s:.0f} tasks/s), "
        f"worker RSS {min(rss, default=0):.0f}-{max(rss, default=0):.0f} MB"
    )
    print(NATS_CLI_HINTS.format(task_id=tasks[0].id))
    print(f"{ok}/{len(tasks)} tasks ok")
    return 0 if ok == len(tasks) else 1
