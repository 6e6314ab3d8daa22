"""Real worker processes: sharing a queue, dying mid-task, stopping on SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections import Counter
from typing import TYPE_CHECKING

import anyio
import pytest

from mesh.contract import Task
from mesh.topology import TASKS_STREAM, TopologySettings
from tests.helpers import ROOT, WorkerProcess, orchestrator_for, poll_until

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.anyio

_DONE = re.compile(r"task ok task_id=(\S+)")


async def test_500_tasks_over_3_worker_processes_each_run_exactly_once(
    nats_url: str, tmp_path: Path
) -> None:
    async with orchestrator_for(nats_url) as orch:
        workers = [
            WorkerProcess(nats_url, "--concurrency", "8", log_path=tmp_path / f"w{i}.log")
            for i in range(3)
        ]
        try:
            await poll_until(lambda: len(orch.workers) == 3, timeout_s=20, what="3 workers")
            tasks = [Task(id=f"many-{i:03d}", prompt=f"task {i}") for i in range(500)]
            _, results = await orch.run(tasks, timeout_s=60)
        finally:
            codes = [w.stop() for w in workers]
        stream = await orch.js.stream_info(TASKS_STREAM)

    assert codes == [0, 0, 0]
    assert len(results) == 500
    assert all(r.status == "ok" and r.attempt == 1 for r in results.values())
    runs = Counter(task_id for w in workers for task_id in _DONE.findall(w.log()))
    assert set(runs) == {t.id for t in tasks}
    assert max(runs.values()) == 1, "a task ran twice"
    per_worker = Counter(r.worker_id for r in results.values())
    assert len(per_worker) == 3, f"work was not shared: {per_worker}"
    assert stream.state.messages == 0


async def test_a_task_of_a_killed_worker_is_redelivered_and_completed(
    nats_url: str, tmp_path: Path
) -> None:
    topology = TopologySettings(ack_wait_s=1.0, heartbeat_interval_s=1.0)
    env = {"D8_ACK_WAIT_S": "1"}
    async with orchestrator_for(nats_url, topology=topology) as orch:
        doomed = WorkerProcess(
            nats_url, "--worker-id", "doomed", env=env, log_path=tmp_path / "doomed.log"
        )
        try:
            await poll_until(lambda: "doomed" in orch.workers, timeout_s=20, what="first worker")
            await orch.submit(Task(id="survivor", prompt="x", metadata={"echo": {"sleep_s": 2}}))
            await poll_until(lambda: _ack_pending(orch), what="the task to be taken")
            doomed.process.send_signal(signal.SIGKILL)
            doomed.stop()
            rescuer = WorkerProcess(
                nats_url, "--worker-id", "rescuer", env=env, log_path=tmp_path / "r.log"
            )
            try:
                result = await orch.wait("survivor", timeout_s=20)
            finally:
                rescuer.stop()
        finally:
            doomed.stop()

    assert result is not None and result.status == "ok"
    assert (result.worker_id, result.attempt) == ("rescuer", 2)


async def _ack_pending(orch: object) -> bool:
    info = await orch.js.consumer_info(TASKS_STREAM, "chat-any")  # type: ignore[attr-defined]
    return bool(info.num_ack_pending == 1)


async def test_sigterm_finishes_in_flight_work_and_removes_the_heartbeat(
    nats_url: str, tmp_path: Path
) -> None:
    async with orchestrator_for(nats_url) as orch:
        worker = WorkerProcess(nats_url, "--worker-id", "polite", log_path=tmp_path / "w.log")
        try:
            await poll_until(lambda: "polite" in orch.workers, timeout_s=20, what="worker")
            await orch.submit(Task(id="finish-me", prompt="x", metadata={"echo": {"sleep_s": 1}}))
            await poll_until(lambda: _ack_pending(orch), what="the task to be taken")
            worker.process.send_signal(signal.SIGTERM)
            result = await orch.wait("finish-me", timeout_s=20)
            await poll_until(
                lambda: "polite" not in orch.workers, timeout_s=5, what="heartbeat removal"
            )
            code = await anyio.to_thread.run_sync(worker.process.wait, 20)
        finally:
            worker.stop()
    assert code == 0
    assert result is not None and result.status == "ok" and result.worker_id == "polite"
    assert "heartbeat removed" in worker.log()


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--backend", "nope"], {}, "unknown backend 'nope': choose one of"),
        (["--concurrency", "-1"], {}, "--concurrency -1: use 1 or more"),
        (
            [],
            {"D8_ACK_WAIT_S": "soon"},
            "D8_ACK_WAIT_S='soon' is not a number; set it like D8_ACK_WAIT_S=30",
        ),
        ([], {"NATS_URL": "nats://127.0.0.1:1"}, "cannot connect to NATS at nats://127.0.0.1:1"),
        (
            [],
            {"NATS_URL": "nats://me:s3cret@127.0.0.1:1"},
            "cannot connect to NATS at nats://***@127.0.0.1:1",
        ),
        (["--backend", "ollama"], {}, "the ollama backend needs a model"),
    ],
)
def test_worker_start_up_errors_say_what_to_fix(
    args: list[str], env: dict[str, str], message: str
) -> None:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "NATS_URL": "nats://127.0.0.1:1", **env}
    done = subprocess.run(
        [sys.executable, "-m", "mesh.cli", "worker", *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert message in done.stderr
    assert "s3cret" not in done.stderr + done.stdout
