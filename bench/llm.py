"""What the mesh adds to an LLM call: direct `ollama` calls against mesh tasks, alternated.

Both paths reach the same local Ollama-protocol server (`bench.fake_ollama`), which answers
each chat after a fixed delay. The direct path is the `ollama` library's async client in
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
from mesh.contract import Task

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
        with fresh_server() as server:
            async with MeshSystem(server.url, worker_args=worker_args) as system:
                for seq in range(calls + 2):
                    started = time.perf_counter()
                    await client.chat(model=MODEL, messages=[{"role": "user", "content": PROMPT}])
                    direct_ms = (time.perf_counter() - started) * 1000
                    task = Task(id=f"llm-{seq}", prompt=PROMPT)
                    started = time.perf_counter()
                    _, results = await system.orch.run([task], 30)
                    mesh_ms = (time.perf_counter() - started) * 1000
                    if results.get(task.id) is None or results[task.id].status != "ok":
                        raise RuntimeError(f"mesh LLM task failed: {results.get(task.id)}")
                    if seq >= 2:  # the first two warm up connections on both paths
                        direct.append(direct_ms)
                        mesh.append(mesh_ms)
                worker_rss = rss_mb(system.workers[0].pid)
                worker_peak = rss_mb(system.workers[0].pid, "VmHWM")
    finally:
        fake.stop()
    out: dict[str, Any] = {"calls": calls, "server_delay_ms": delay_ms}
    out["direct"] = _stats(direct)
    out["mesh"] = _stats(mesh)
    out["added_p50_ms"] = round((out["mesh"]["p50_ms"] or 0) - (out["direct"]["p50_ms"] or 0), 3)
    out["added_mean_ms"] = round((out["mesh"]["mean_ms"] or 0) - (out["direct"]["mean_ms"] or 0), 3)
    out["ollama_worker_rss_mb"] = worker_rss
    out["ollama_worker_peak_rss_mb"] = worker_peak
    return out
