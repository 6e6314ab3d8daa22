"""The benchmark sections and their sizes: a full run for the docs, a tiny one for CI."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bench import footprint, llm, peers, profile
from bench.common import ROOT
from bench.meshrun import MeshSystem
from bench.raw import RawSystem
from bench.runner import measure

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

__all__ = ["SECTIONS", "Sizes", "run_suite"]


@dataclass(frozen=True)
class Sizes:
    """How many tasks and repetitions each section uses."""

    throughput_n: int = 10_000
    latency_n: int = 2_000
    rate: float = 500.0
    reps: int = 3
    warmup: int = 500
    log_n: int = 5_000
    llm_calls: int = 60
    backlog: int = 100_000
    backlog_sample_s: float = 2.0
    scale_n: int = 10_000
    scale_workers: tuple[int, ...] = (1, 2, 4, 20)
    profile_n: int = 10_000

    @classmethod
    def tiny(cls) -> Sizes:
        """A few hundred tasks: proves the bench works, measures nothing worth quoting."""
        return cls(
            throughput_n=300,
            latency_n=100,
            reps=1,
            warmup=50,
            log_n=200,
            llm_calls=3,
            backlog=1_000,
            backlog_sample_s=0.5,
            scale_n=200,
            scale_workers=(1, 2),
            profile_n=300,
        )


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return round(statistics.median(values), 3) if values else None


def _pairs(raw: list[dict[str, Any]], mesh: list[dict[str, Any]], key: str) -> list[float]:
    """Mesh / raw for each interleaved pair of runs."""
    return [
        round(m[key] / r[key], 3)
        for r, m in zip(raw, mesh, strict=True)
        if r.get(key) and m.get(key)
    ]


async def _versus(sizes: Sizes, rate: float | None) -> dict[str, Any]:
    """Raw and mesh interleaved, `sizes.reps` pairs, on one fresh server per run."""
    n = sizes.latency_n if rate else sizes.throughput_n
    raw: list[dict[str, Any]] = []
    mesh: list[dict[str, Any]] = []
    for _ in range(sizes.reps):
        raw.append(await measure(RawSystem, n, rate=rate, warmup=sizes.warmup))
        mesh.append(await measure(MeshSystem, n, rate=rate, warmup=sizes.warmup))
    out: dict[str, Any] = {"raw_runs": raw, "mesh_runs": mesh}
    for name, runs in (("raw", raw), ("mesh", mesh)):
        out[name] = {
            key: _median(runs, key) for key in ("tasks_per_s", "p50_ms", "p99_ms", "seconds")
        }
        out[name]["cpu_us_per_task"] = {
            role: _median([r["cpu_us_per_task"] for r in runs], role)
            for role in ("worker", "server", "producer")
        }
        out[name]["worker_peak_rss_mb"] = max(r["worker_peak_rss_mb"][0] or 0 for r in runs)
        out[name]["all_ok"] = all(r["ok"] and r.get("acked_verified") for r in runs)
    key = "p50_ms" if rate else "tasks_per_s"
    out["ratios"] = _pairs(raw, mesh, key)
    out["ratio_median"] = round(statistics.median(out["ratios"]), 3) if out["ratios"] else None
    return out


async def throughput(sizes: Sizes) -> dict[str, Any]:
    return await _versus(sizes, None)


async def latency(sizes: Sizes) -> dict[str, Any]:
    return await _versus(sizes, sizes.rate)


async def log_cost(sizes: Sizes) -> dict[str, Any]:
    """The per-task INFO line: worker CPU with it (`info`) and without (`warning`), interleaved."""
    runs: dict[str, list[dict[str, Any]]] = {"warning": [], "info": []}
    for _ in range(max(2, sizes.reps) if sizes.reps > 1 else 1):
        for level in runs:
            runs[level].append(
                await measure(
                    lambda url, level=level: MeshSystem(url, log_level=level),
                    sizes.log_n,
                    warmup=sizes.warmup,
                )
            )
    worker = {
        level: _median([r["cpu_us_per_task"] for r in rs], "worker") for level, rs in runs.items()
    }
    return {
        "tasks_per_s": {level: _median(rs, "tasks_per_s") for level, rs in runs.items()},
        "worker_cpu_us_per_task": worker,
        "info_line_us": round((worker["info"] or 0) - (worker["warning"] or 0), 1),
    }


async def scale(sizes: Sizes) -> dict[str, Any]:
    """Mesh throughput with 1, 2, 4 ... worker processes sharing one capability."""
    out: dict[str, Any] = {}
    for count in sizes.scale_workers:
        run = await measure(
            lambda url, count=count: MeshSystem(url, workers=count),
            sizes.scale_n,
            warmup=sizes.warmup,
        )
        out[str(count)] = {
            "tasks_per_s": run["tasks_per_s"],
            "ok": run["ok"] and run.get("acked_verified"),
            "cpu_us_per_task": run["cpu_us_per_task"],
            "worker_rss_mb_max": max(v or 0 for v in run["worker_rss_mb"]),
        }
    return out


async def depth(sizes: Sizes) -> dict[str, Any]:
    """One echo worker at its default concurrency and at 256, alternated: how much a deeper
    pipeline (more tasks in flight per worker) moves throughput and CPU per task."""
    runs: dict[str, list[dict[str, Any]]] = {"default": [], "256": []}
    for _ in range(max(1, sizes.reps - 1)):
        for name in runs:
            concurrency = None if name == "default" else int(name)
            runs[name].append(
                await measure(
                    lambda url, c=concurrency: MeshSystem(url, concurrency=c),
                    sizes.scale_n,
                    warmup=sizes.warmup,
                )
            )
    return {
        name: {
            "tasks_per_s": _median(rs, "tasks_per_s"),
            "cpu_us_per_task": {
                role: _median([r["cpu_us_per_task"] for r in rs], role)
                for role in ("worker", "server", "producer")
            },
        }
        for name, rs in runs.items()
    }


async def llm_overhead(sizes: Sizes) -> dict[str, Any]:
    return await llm.llm_overhead(sizes.llm_calls)


async def memory(sizes: Sizes) -> dict[str, Any]:
    out = await footprint.idle_memory()
    out["backlog"] = await footprint.backlog_memory(sizes.backlog, sizes.backlog_sample_s)
    return out


async def startup(sizes: Sizes) -> dict[str, Any]:
    return await footprint.startup_time()


async def peer_systems(sizes: Sizes) -> dict[str, Any]:
    return await peers.run_peers(sizes)


async def profile_mesh(sizes: Sizes) -> dict[str, Any]:
    return await profile.profile_mesh(sizes.profile_n, ROOT / "bench" / "results")


SECTIONS: dict[str, Callable[[Sizes], Awaitable[dict[str, Any]]]] = {
    "throughput": throughput,
    "latency": latency,
    "log_cost": log_cost,
    "llm": llm_overhead,
    "memory": memory,
    "startup": startup,
    "scale": scale,
    "depth": depth,
    "profile": profile_mesh,
    "peers": peer_systems,
}


async def run_suite(names: list[str], sizes: Sizes, say: Callable[[str], None]) -> dict[str, Any]:
    """Run the named sections in order; a failed section records its error and the rest go on."""
    results: dict[str, Any] = {}
    for name in names:
        started = time.monotonic()
        say(f"section {name} ...")
        try:
            results[name] = await SECTIONS[name](sizes)
        except Exception as exc:  # a broken section must not hide the others' numbers
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        results[name]["section_seconds"] = round(time.monotonic() - started, 1)
        say(f"section {name} done in {results[name]['section_seconds']}s")
    return results
