"""One measured run of one system: warm up, measure, and collect CPU, memory and server figures."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, Protocol, Self

from bench.common import Timeline, cpu_seconds, fresh_server, rss_mb, server_counters

if TYPE_CHECKING:
    from collections.abc import Callable
    from contextlib import AbstractContextManager

__all__ = ["System", "measure", "wait_count"]

WARMUP = 500


class System(Protocol):
    """What a benchmarked system offers the runner."""

    name: str

    async def __aenter__(self) -> Self: ...
    async def __aexit__(self, *exc: object) -> None: ...
    def worker_pids(self) -> list[int]: ...
    async def run(self, timeline: Timeline, offset: int, rate: float | None) -> float: ...
    async def drained(self) -> bool: ...


async def wait_count(timeline: Timeline, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while timeline.count < timeline.n:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.002)
    return True


async def measure(
    make: Callable[[str], System],
    n: int,
    *,
    rate: float | None = None,
    warmup: int = WARMUP,
    server_factory: Callable[[], AbstractContextManager[Any]] = fresh_server,
) -> dict[str, Any]:
    """Run `n` tasks through a fresh server and the system `make(url)` builds.

    With `rate`, tasks are released on an absolute schedule (latency mode); without, as fast
    as the producer can publish (throughput mode). `server_factory` starts the server (a fresh
    nats-server unless told otherwise); what it yields needs `url`, `pid` and `monitor_url`.
    """
    with server_factory() as server:
        async with make(server.url) as system:
            warm = Timeline(warmup)
            await system.run(warm, 0, None)
            if not await wait_count(warm, 60):
                raise RuntimeError(f"{system.name}: warm-up finished {warm.count}/{warmup}")
            await asyncio.sleep(0.2)
            pids = system.worker_pids()
            cpu0 = (cpu_seconds(pids), cpu_seconds([server.pid or 0]), time.process_time())
            counters0 = server_counters(server)
            timeline = Timeline(n)
            t0 = await system.run(timeline, warmup, rate)
            finished = await wait_count(timeline, 60 + n / 500)
            cpu1 = (cpu_seconds(pids), cpu_seconds([server.pid or 0]), time.process_time())
            counters1 = server_counters(server)
            out: dict[str, Any] = {
                "system": system.name,
                "n": n,
                "mode": "latency" if rate else "throughput",
            }
            out.update(timeline.summary(t0))
            out["ok"] = finished and timeline.duplicates == 0
            out["cpu_us_per_task"] = {
                role: round((after - before) * 1e6 / n, 1)
                for role, before, after in zip(
                    ("worker", "server", "producer"), cpu0, cpu1, strict=True
                )
            }
            out["server_per_task"] = {
                key: round((counters1[key] - counters0.get(key, 0)) / n, 2) for key in counters1
            }
            out["worker_rss_mb"] = [rss_mb(pid) for pid in pids]
            out["worker_peak_rss_mb"] = [rss_mb(pid, "VmHWM") for pid in pids]
            out["server_rss_mb"] = rss_mb(server.pid or 0)
            for _ in range(50):
                if await system.drained():
                    out["acked_verified"] = True
                    break
                await asyncio.sleep(0.1)
            else:
                out["acked_verified"] = False
            if rate:
                out["offered_rate"] = rate
            return out
