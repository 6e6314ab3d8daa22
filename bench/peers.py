"""Peer task queues (taskiq-nats, FastStream, Celery), run only with `--peers`.

Each peer runs the raw baseline's workload (`bench.raw`): no-op tasks carrying the ~200-byte
JSON payload, one worker process, and completion observed end to end by the producer in this
process. The section measures raw nats-py JetStream itself, interleaved with the peers on a
fresh server per run, so every ratio compares runs made minutes apart on the same machine:
`sizes.reps` throughput runs of each, then latency runs at `sizes.rate` tasks per second for
each system whose throughput is well above that rate.

The drivers live in `bench.peers_taskiq`, `bench.peers_faststream` and `bench.peers_celery`.
A peer whose library (the extra `peers`) or server (Debian's `redis-server`, for Celery) is
missing is reported as skipped with the reason: the bench installs nothing.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import statistics
import subprocess
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Any

from bench.raw import FETCH_BATCH, RawSystem
from bench.runner import measure

if TYPE_CHECKING:
    from bench.suite import Sizes

__all__ = ["PEERS", "Peer", "run_peers"]

#: Bound on one measured run (server start, worker start, warm-up, run, drain check).
RUN_LIMIT_S = 300.0
#: A latency run at `sizes.rate` needs this much headroom in measured throughput.
LATENCY_HEADROOM = 1.5


@dataclass(frozen=True)
class Peer:
    """One peer: what must be importable, where its driver is, which packages to report."""

    name: str
    modules: tuple[str, ...]
    driver: str
    system: str
    packages: tuple[str, ...]
    needs_redis: bool = False


PEERS = (
    Peer(
        "taskiq-nats",
        ("taskiq", "taskiq_nats"),
        "bench.peers_taskiq",
        "TaskiqSystem",
        ("taskiq", "taskiq-nats"),
    ),
    Peer(
        "faststream-nats",
        ("faststream",),
        "bench.peers_faststream",
        "FastStreamSystem",
        ("faststream", "fast-depends", "pydantic"),
    ),
    Peer(
        "celery-redis",
        ("celery", "redis"),
        "bench.peers_celery",
        "CelerySystem",
        ("celery", "kombu", "redis"),
        needs_redis=True,
    ),
)


@dataclass
class _Loaded:
    """A peer whose driver imported, with its runs so far."""

    peer: Peer
    driver: Any
    throughput_runs: list[dict[str, Any]]
    latency_runs: list[dict[str, Any]]
    error: str | None = None
    latency_skipped: str | None = None


def _why_not_runnable(peer: Peer) -> str | None:
    for module in peer.modules:
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed in this venv (extra `peers`)"
    if peer.needs_redis:
        from bench.peers_celery import server_binary

        if server_binary() is None:
            return "redis-server is not on PATH (Debian package `redis-server`)"
    return None


def _versions(peer: Peer) -> dict[str, str]:
    versions: dict[str, str] = {}
    for package in peer.packages:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "?"
    if peer.needs_redis:
        from bench.peers_celery import server_binary

        out = subprocess.run(
            [server_binary() or "redis-server", "--version"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        versions["redis-server"] = out.split("v=", 1)[-1].split()[0] if "v=" in out else "?"
    return versions


async def _one_run(loaded: _Loaded, n: int, rate: float | None, sizes: Sizes) -> None:
    """One measured run of a peer, appended to its runs; a failure is kept as its error."""
    system = getattr(loaded.driver, loaded.peer.system)
    server = loaded.driver.redis_server if loaded.peer.needs_redis else None
    kwargs: dict[str, Any] = {"rate": rate, "warmup": sizes.warmup}
    if server is not None:
        kwargs["server_factory"] = server
    try:
        async with asyncio.timeout(RUN_LIMIT_S):
            run = await measure(system, n, **kwargs)
    except Exception as exc:  # one broken peer must not hide the others' numbers
        loaded.error = f"{'latency' if rate else 'throughput'} run: {type(exc).__name__}: {exc}"
        return
    (loaded.latency_runs if rate else loaded.throughput_runs).append(run)


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return round(statistics.median(values), 3) if values else None


def _summary(
    throughput_runs: list[dict[str, Any]], latency_runs: list[dict[str, Any]]
) -> dict[str, Any]:
    """The shape of the throughput section's `raw`/`mesh` entries, plus the latency figures."""
    runs = throughput_runs + latency_runs
    out: dict[str, Any] = {
        "tasks_per_s": _median(throughput_runs, "tasks_per_s"),
        "seconds": _median(throughput_runs, "seconds"),
        "p50_ms": _median(latency_runs, "p50_ms"),
        "p99_ms": _median(latency_runs, "p99_ms"),
        "cpu_us_per_task": {
            role: _median([r["cpu_us_per_task"] for r in throughput_runs], role)
            for role in ("worker", "server", "producer")
        },
        "worker_peak_rss_mb": max((r["worker_peak_rss_mb"][0] or 0 for r in runs), default=None),
        "worker_tree_peak_rss_mb": max(
            (sum(v or 0 for v in r["worker_peak_rss_mb"]) for r in runs), default=None
        ),
        "all_ok": bool(runs) and all(r["ok"] and r.get("acked_verified") for r in runs),
        "throughput_runs": throughput_runs,
        "latency_runs": latency_runs,
    }
    if latency_runs:
        out["offered_rate"] = latency_runs[0].get("offered_rate")
    return out


def _ratios(peer: list[dict[str, Any]], raw: list[dict[str, Any]], key: str) -> list[float]:
    """Peer / raw for each pair of runs made in the same round."""
    return [
        round(p[key] / r[key], 3)
        for r, p in zip(raw, peer, strict=False)
        if r.get(key) and p.get(key)
    ]


def _peer_entry(loaded: _Loaded, raw: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out = _summary(loaded.throughput_runs, loaded.latency_runs)
    out["ratios"] = _ratios(loaded.throughput_runs, raw["throughput"], "tasks_per_s")
    out["ratio_median"] = round(statistics.median(out["ratios"]), 3) if out["ratios"] else None
    p50 = _ratios(loaded.latency_runs, raw["latency"], "p50_ms")
    out["p50_ratio_median"] = round(statistics.median(p50), 3) if p50 else None
    out["settings"] = loaded.driver.SETTINGS
    out["versions"] = _versions(loaded.peer)
    if loaded.error:
        out["error"] = loaded.error
    if loaded.latency_skipped:
        out["latency_skipped"] = loaded.latency_skipped
    return out


async def _raw_run(runs: list[dict[str, Any]], n: int, rate: float | None, sizes: Sizes) -> None:
    async with asyncio.timeout(RUN_LIMIT_S):
        runs.append(await measure(RawSystem, n, rate=rate, warmup=sizes.warmup))


def _latency_feasible(loaded: _Loaded, rate: float) -> str | None:
    best = max((r.get("tasks_per_s") or 0 for r in loaded.throughput_runs), default=0)
    if best < rate * LATENCY_HEADROOM:
        return f"measured {best:,.0f} tasks/s is too close to the offered {rate:,.0f}/s"
    return None


def _load() -> tuple[list[_Loaded], dict[str, Any]]:
    """The peers that can run, with their drivers imported, and why the others cannot."""
    loaded: list[_Loaded] = []
    skipped: dict[str, Any] = {}
    for peer in PEERS:
        reason = _why_not_runnable(peer)
        if reason is None:
            try:
                loaded.append(_Loaded(peer, importlib.import_module(peer.driver), [], []))
            except ImportError as exc:
                reason = f"driver {peer.driver} did not import: {exc}"
        if reason is not None:
            skipped[peer.name] = {"skipped": reason}
    return loaded, skipped


async def run_peers(sizes: Sizes) -> dict[str, Any]:
    """Raw JetStream and every runnable peer, interleaved; one entry per peer or its skip."""
    loaded, out = _load()
    if not loaded:
        return out
    raw: dict[str, list[dict[str, Any]]] = {"throughput": [], "latency": []}
    for _ in range(sizes.reps):
        await _raw_run(raw["throughput"], sizes.throughput_n, None, sizes)
        for item in loaded:
            if item.error is None:
                await _one_run(item, sizes.throughput_n, None, sizes)
    for item in loaded:
        if item.error is None:
            item.latency_skipped = _latency_feasible(item, sizes.rate)
    for _ in range(sizes.reps):
        await _raw_run(raw["latency"], sizes.latency_n, sizes.rate, sizes)
        for item in loaded:
            if item.error is None and item.latency_skipped is None:
                await _one_run(item, sizes.latency_n, sizes.rate, sizes)
    out["raw"] = _summary(raw["throughput"], raw["latency"])
    out["raw"]["settings"] = {"fetch_batch": FETCH_BATCH, "producer": "js.publish_async"}
    for item in loaded:
        out[item.peer.name] = _peer_entry(item, raw)
    return out
