"""Pieces every benchmark section shares: payloads, timing, process figures, child processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mesh.server import EmbeddedServer

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

__all__ = [
    "ROOT",
    "Child",
    "Timeline",
    "cpu_seconds",
    "free_port",
    "fresh_server",
    "payload",
    "percentile",
    "rss_mb",
    "server_counters",
]

ROOT = Path(__file__).resolve().parent.parent
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAYLOAD_BYTES = 200


def _pad() -> str:
    base = {"seq": 0, "kind": "noop", "tenant": "acme", "user": 4242, "pad": ""}
    return "p" * (_PAYLOAD_BYTES - 4 - len(json.dumps(base, separators=(",", ":"))))


_PAD = _pad()


def payload(seq: int) -> dict[str, object]:
    """A JSON object of 196 to 200 bytes that carries its sequence number `seq` (< 100,000)."""
    return {"seq": seq, "kind": "noop", "tenant": "acme", "user": 4242, "pad": _PAD}


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of already sorted `values`."""
    if not values:
        return None
    rank = max(1, -(-int(q * len(values)) // 100))
    return values[min(len(values), rank) - 1]


@dataclass
class Timeline:
    """Enqueue and completion times per sequence number, for one measured run."""

    n: int
    enqueued: list[float] = field(default_factory=list)
    done: list[float] = field(default_factory=list)
    count: int = 0
    duplicates: int = 0

    def __post_init__(self) -> None:
        self.enqueued = [0.0] * self.n
        self.done = [0.0] * self.n

    def finish(self, seq: int, at: float) -> None:
        if self.done[seq]:
            self.duplicates += 1
            return
        self.done[seq] = at
        self.count += 1

    def summary(self, t0: float) -> dict[str, float | int | None]:
        """Throughput over first enqueue to last completion, and latency percentiles."""
        finished = [s for s in range(self.n) if self.done[s]]
        if not finished:
            return {"completed": 0}
        end = max(self.done[s] for s in finished)
        latencies = sorted((self.done[s] - self.enqueued[s]) * 1000 for s in finished)
        return {
            "completed": len(finished),
            "duplicates": self.duplicates,
            "seconds": round(end - t0, 4),
            "tasks_per_s": round(len(finished) / (end - t0), 1),
            "p50_ms": round(percentile(latencies, 50) or 0.0, 3),
            "p99_ms": round(percentile(latencies, 99) or 0.0, 3),
            "max_ms": round(latencies[-1], 3),
        }


def cpu_seconds(pids: Sequence[int]) -> float:
    """User plus system CPU seconds used so far by the processes `pids`."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        total += (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    return total


def rss_mb(pid: int, key: str = "VmRSS") -> float | None:
    """A process's resident memory (`VmRSS`) or its peak (`VmHWM`) in MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def server_counters(server: EmbeddedServer) -> dict[str, int]:
    """Messages in and out and read/write syscalls of the server so far."""
    import httpx

    counters: dict[str, int] = {}
    if server.monitor_url:
        varz = httpx.get(f"{server.monitor_url}/varz", timeout=5).json()
        counters.update(in_msgs=varz["in_msgs"], out_msgs=varz["out_msgs"])
    try:
        for line in Path(f"/proc/{server.pid}/io").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("syscr", "syscw"):
                counters[name] = int(value)
    except OSError:
        pass
    return counters


@contextmanager
def fresh_server() -> Iterator[EmbeddedServer]:
    """A new embedded JetStream server on a free port with a temporary store."""
    with tempfile.TemporaryDirectory(prefix="d8-bench-") as store:
        with EmbeddedServer(Path(store) / "store") as server:
            yield server


class Child:
    """A child process started by the bench, stopped by its PID; output goes to a log file."""

    def __init__(
        self, argv: Sequence[str], *, name: str, env: dict[str, str] | None = None
    ) -> None:
        log_dir = Path(tempfile.gettempdir()) / "d8-bench-logs"
        log_dir.mkdir(exist_ok=True)
        self.log_path = log_dir / f"{name}-{os.getpid()}.log"
        self._log = self.log_path.open("wb")
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        self.process = subprocess.Popen(
            list(argv), env=full_env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT
        )
        self.pid = self.process.pid

    @classmethod
    def d8(cls, *args: str, name: str, env: dict[str, str] | None = None) -> Child:
        """A `d8 ...` command run by this interpreter."""
        return cls([sys.executable, "-m", "mesh.cli", *args], name=name, env=env)

    def alive(self) -> bool:
        return self.process.poll() is None

    def tail(self, lines: int = 10) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace_s: float = 10.0) -> str:
        """SIGTERM, then SIGKILL after `grace_s`; say which ended it."""
        how = "exited"
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
                how = "killed"
        self._log.close()
        return how


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port
