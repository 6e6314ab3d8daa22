"""Peer task queues (taskiq-nats, FastStream, Celery), run only with `--peers`.

LIMITATION: the peers are not driven by this bench yet. Each one is reported as skipped,
with the reason: not installed in the project venv (the bench installs nothing), or
installed but without a driver here. The reference figures for them come from the
shared harness run on this machine kind and are quoted in docs/benchmarks.md.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.suite import Sizes

__all__ = ["PEERS", "run_peers"]

#: Peer name -> the module that must be importable to run it.
PEERS = {"taskiq-nats": "taskiq_nats", "faststream-nats": "faststream", "celery-redis": "celery"}


async def run_peers(sizes: Sizes) -> dict[str, Any]:
    """One entry per peer: its numbers, or why it was skipped."""
    out: dict[str, Any] = {}
    for name, module in PEERS.items():
        if importlib.util.find_spec(module) is None:
            out[name] = {"skipped": f"{module} is not installed in this venv"}
        else:
            out[name] = {"skipped": "installed, but this bench has no driver for it yet"}
    return out
