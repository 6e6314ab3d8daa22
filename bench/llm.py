"""What the mesh adds to an LLM call: direct `ollama` calls against mesh tasks, alternated.

Both paths reach the same local Ollama-protocol server (`bench.fake_ollama`), which answers
each call after a fixed delay. The direct path is the `ollama` library's async client in
this process; the mesh path is a task submitted through the orchestrator, run by a real
`d8 worker --backend ollama` process (the same library inside), its result observed by the
orchestrator. Calls alternate one by one, so drift on the shared machine hits both alike.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import ollama

from bench.common import Child, free_port, fresh_server, percentile, rss_mb
from bench.fake_ollama import MODEL
from bench.meshrun import MeshSystem
from mesh.contract import Result, Task

__all__ = ["llm_overhead"]

PROMPT = "Say ok."


async def _wait_ready(child: Child, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while "ready" not in child.tail(3):
        if not child.alive() or time.monotonic() > deadline:
            raise RuntimeError(f"fake Ollama did not start: {child.tail()}")
        await asyncio.sleep(0.02)


def _stats(values: list[float]) -> dict[str, float | None]:
    ordered = sorted(values)
    return {
        "p50_ms": round(percentile(ordered, 50) or 0.0, 3),
        "p99_ms": round(percentile(ordered, 99) or 0.0, 3),
        "mean_ms": round(sum(ordered) / len(ordered), 3) if ordered else None,
    }


def _stages(
    result: Result, submitted_at: float, observed_at: float, direct_ms: float
) -> dict[str, float]:
    """Where a mesh call's time went, from the result's timings and this host's clock.

    `stored` is the stream's timestamp of the task (finished_at - total_ms); all clocks
    are this machine's, so the stages add up to the mesh call less its return.
    """
    stored_at = result.finished_at - result.timings.total_ms / 1000
    return {
        "submit_to_stored": (stored_at - submitted_at) * 1000,
        "stored_to_worker": result.timings.queued_ms,
        "worker_run_less_direct_call": result.timings.run_ms - direct_ms,
        "result_to_observed": (observed_at - result.finished_at) * 1000,
    }


async def llm_overhead(calls: int, delay_ms: float = 50.0) -> dict[str, Any]:
    """Time `calls` direct and `calls` mesh calls to a server answering in `delay_ms`."""
    port = free_port()
    fake = Child(
        [
            sys.executable,
            "-m",
            "bench.fake_ollama",
            "--port",
            str(port),
            "--delay-ms",
            str(delay_ms),
        ],
        name="fake-ollama",
    )
    try:
        await _wait_ready(fake)
        host = f"http://127.0.0.1:{port}"
        client = ollama.AsyncClient(host=host)
        worker_args = ("--backend", "ollama", "--model", MODEL, "--base-url", host)
        direct: list[float] = []
        mesh: list[float] = []
        stages: list[dict[str, float]] = []
        with fresh_server() as server:
            async with MeshSystem(server.url, worker_args=worker_args) as system:
                for seq in range(calls + 2):
                    started = time.perf_counter()
                    # The call the worker makes for a prompt task.
                    await client.generate(model=MODEL, prompt=PROMPT)
                    direct_ms = (time.perf_counter() - started) * 1000
                    task = Task(id=f"llm-{seq}", prompt=PROMPT)
                    observed: list[float] = []
                    wall, started = time.time(), time.perf_counter()
                    _, results = await system.orch.run(
                        [task], 30, on_result=lambda _, seen=observed: seen.append(time.time())
                    )
                    mesh_ms = (time.perf_counter() - started) * 1000
                    result = results.get(task.id)
                    if result is None or result.status != "ok":
                        raise RuntimeError(f"mesh LLM task failed: {result}")
                    if seq >= 2:  # the first two warm up connections on both paths
                        direct.append(direct_ms)
                        mesh.append(mesh_ms)
                        stages.append(_stages(result, wall, observed[0], direct_ms))
                worker_rss = rss_mb(system.workers[0].pid)
                worker_peak = rss_mb(system.workers[0].pid, "VmHWM")
    finally:
        fake.stop()
    out: dict[str, Any] = {"calls": calls, "server_delay_ms": delay_ms}
    out["direct"] = _stats(direct)
    out["mesh"] = _stats(mesh)
    out["added_p50_ms"] = round((out["mesh"]["p50_ms"] or 0) - (out["direct"]["p50_ms"] or 0), 3)
    out["added_mean_ms"] = round((out["mesh"]["mean_ms"] or 0) - (out["direct"]["mean_ms"] or 0), 3)
    out["mesh_stages_p50_ms"] = (
        {
            name: round(percentile(sorted(s[name] for s in stages), 50) or 0.0, 3)
            for name in stages[0]
        }
        if stages
        else {}
    )
    out["ollama_worker_rss_mb"] = worker_rss
    out["ollama_worker_peak_rss_mb"] = worker_peak
    return out
