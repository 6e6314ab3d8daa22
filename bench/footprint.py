"""Memory and start-up: idle RSS, what an echo worker imports, a deep backlog, `d8 up`.

- An idle echo worker's RSS, and the modules it imported (`python -X importtime`): no
  backend SDK (ollama, groq, google-genai, openai) may be among them.
- The `d8 orchestrator` process's RSS, idle and while a backlog waits.
- A backlog: the echo worker's slots are held by sleeping tasks while `backlog` more tasks
  wait in the stream; the worker's and the server's RSS are sampled while they wait, to
  show that a worker takes only what it has slots for.
- Start-up: `d8 up` from process start to the first result observed through its HTTP API.
"""

from __future__ import annotations

import asyncio
import re
import tempfile
import time
from typing import Any

import httpx

from bench.common import Child, free_port, fresh_server, rss_mb
from bench.meshrun import echo_task
from mesh.connection import ConnectionSettings
from mesh.contract import Task
from mesh.topology import TASKS_STREAM
from orchestrator.core import Orchestrator, OrchestratorSettings

__all__ = ["SDK_MODULES", "backlog_memory", "idle_memory", "startup_time"]

#: Top-level modules of backend SDKs that an echo worker must not import.
SDK_MODULES = ("ollama", "groq", "google.genai", "openai", "httpx")
_IMPORT_LINE = re.compile(r"^import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)$")
# The echo worker's slots (its default concurrency), all held while the backlog waits.
_ECHO_SLOTS = 64
# Longer than any run: the sleepers never finish, they are handed back at shutdown.
_HOLD_S = 600.0


async def _until(check: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.02)


def _imports(log: str) -> dict[str, Any]:
    """Modules from `-X importtime` output: backend SDKs among them, the slowest top-level ones."""
    top: dict[str, int] = {}
    names: set[str] = set()
    for line in log.splitlines():
        match = _IMPORT_LINE.match(line)
        if match is None:
            continue
        names.add(match.group(3))
        if len(match.group(2)) == 1:  # one space after the bar: imported at top level
            top[match.group(3)] = int(match.group(1))
    loaded = [m for m in SDK_MODULES if any(n == m or n.startswith(m + ".") for n in names)]
    heaviest = sorted(top.items(), key=lambda item: -item[1])[:8]
    return {
        "modules": len(names),
        "import_ms": round(sum(top.values()) / 1000, 1),
        "heaviest_ms": {name: round(us / 1000, 1) for name, us in heaviest},
        "sdk_modules_loaded": loaded,
    }


def _orchestrator(url: str) -> Orchestrator:
    settings = OrchestratorSettings(
        connection=ConnectionSettings(servers=(url,), name="bench-footprint"), watch_workers=True
    )
    return Orchestrator(settings)


async def idle_memory() -> dict[str, Any]:
    """RSS of an idle echo worker and an idle `d8 orchestrator`; the echo worker's imports."""
    with fresh_server() as server:
        async with _orchestrator(server.url) as orch:
            env = {"NATS_URL": server.url, "D8_HEARTBEAT_S": "1", "PYTHONPROFILEIMPORTTIME": "1"}
            worker = Child.d8(
                "--log-level", "warning", "worker", "--backend", "echo", name="idle-echo", env=env
            )
            orchestrator = Child.d8(
                "--log-level",
                "warning",
                "orchestrator",
                "--http-port",
                str(free_port()),
                name="idle-orchestrator",
                env={"NATS_URL": server.url},
            )
            try:
                await _until(lambda: len(orch.workers) == 1, 30, "the echo worker")
                await orch.run([Task(id="idle-1", prompt="hello")], 10)
                await asyncio.sleep(0.5)
                out = {
                    "echo_worker_rss_mb": rss_mb(worker.pid),
                    "echo_worker_peak_rss_mb": rss_mb(worker.pid, "VmHWM"),
                    "orchestrator_rss_mb": rss_mb(orchestrator.pid),
                    "server_rss_mb": rss_mb(server.pid or 0),
                }
            finally:
                worker.stop()
                orchestrator.stop()
            out["echo_worker_imports"] = _imports(worker.log_path.read_text(errors="replace"))
            return out


async def backlog_memory(backlog: int, sample_s: float = 2.0) -> dict[str, Any]:
    """RSS of a busy echo worker, `d8 orchestrator` and the server while `backlog` tasks wait.

    Tasks that sleep far longer than the run hold every slot of the worker's queue; the
    backlog is published behind them and RSS sampled for `sample_s`. Stopping the worker
    (grace 1 s) hands the sleepers back; the server is discarded with its store.
    """
    with fresh_server() as server:
        async with _orchestrator(server.url) as orch:
            env = {"NATS_URL": server.url, "D8_HEARTBEAT_S": "1"}
            worker = Child.d8(
                "--log-level",
                "warning",
                "worker",
                "--backend",
                "echo",
                "--grace-s",
                "1",
                name="backlog-echo",
                env=env,
            )
            orchestrator = Child.d8(
                "--log-level",
                "warning",
                "orchestrator",
                "--http-port",
                str(free_port()),
                name="backlog-orchestrator",
                env={"NATS_URL": server.url},
            )
            try:
                await _until(lambda: len(orch.workers) == 1, 30, "the echo worker")
                await asyncio.sleep(0.5)
                before = {
                    "worker": rss_mb(worker.pid),
                    "orchestrator": rss_mb(orchestrator.pid),
                    "server": rss_mb(server.pid or 0),
                }
                blockers = [
                    Task(id=f"block-{i}", prompt="hold", metadata={"echo": {"sleep_s": _HOLD_S}})
                    for i in range(_ECHO_SLOTS)
                ]
                started = time.monotonic()
                await orch.submit_many(blockers)
                tasks = [echo_task("q", seq) for seq in range(backlog)]
                for at in range(0, backlog, 5000):
                    await orch.submit_many(tasks[at : at + 5000])
                del tasks
                published_s = time.monotonic() - started
                peak_worker = peak_orch = 0.0
                sampled_until = time.monotonic() + sample_s
                while time.monotonic() < sampled_until:
                    peak_worker = max(peak_worker, rss_mb(worker.pid) or 0.0)
                    peak_orch = max(peak_orch, rss_mb(orchestrator.pid) or 0.0)
                    await asyncio.sleep(0.1)
                waiting = (await orch.js.stream_info(TASKS_STREAM)).state.messages
                out = {
                    "backlog": backlog,
                    "waiting_in_stream": waiting,
                    "rss_before_mb": before,
                    "rss_while_waiting_mb": {
                        "worker": peak_worker,
                        "orchestrator": peak_orch,
                        "server": rss_mb(server.pid or 0),
                    },
                    "publish_seconds": round(published_s, 2),
                }
            finally:
                worker.stop()
                orchestrator.stop()
            return out


async def startup_time(timeout_s: float = 30.0) -> dict[str, Any]:
    """Seconds from starting `d8 up` (server, orchestrator, one echo worker) to a first result."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="d8-bench-up-") as store:
        # No NATS_URL: `d8 up` starts its own server, as on a fresh machine.
        env = {"D8_STORE_DIR": store, "NATS_URL": "", "D8_HEARTBEAT_S": "1"}
        started = time.perf_counter()
        up = Child.d8(
            "--log-level",
            "warning",
            "up",
            "--workers",
            "1",
            "--backend",
            "echo",
            "--http-port",
            str(port),
            name="d8-up",
            env=env,
        )
        first_answer = None
        try:
            async with httpx.AsyncClient(timeout=5) as client:
                deadline = time.monotonic() + timeout_s
                while time.monotonic() < deadline and up.alive():
                    try:
                        response = await client.post(
                            f"http://127.0.0.1:{port}/tasks?wait=5",
                            json={"id": "first", "prompt": "hello"},
                        )
                    except httpx.TransportError:
                        await asyncio.sleep(0.01)
                        continue
                    if first_answer is None:
                        first_answer = time.perf_counter() - started
                    if response.status_code == 200:
                        elapsed = time.perf_counter() - started
                        return {
                            "seconds_to_first_result": round(elapsed, 3),
                            "seconds_to_http_answer": round(first_answer, 3),
                        }
                    await asyncio.sleep(0.01)
            raise RuntimeError(f"d8 up gave no result within {timeout_s}s: {up.tail()}")
        finally:
            up.stop(grace_s=20)
