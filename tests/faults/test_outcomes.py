"""Every submitted task ends in exactly one stored outcome, also when a worker dies mid-load."""

from __future__ import annotations

import signal
import time
from typing import TYPE_CHECKING

import anyio

from mesh.contract import Task
from tests.faults.helpers import fault_topology, start_worker
from tests.faults.ledger import read_ledger
from tests.helpers import orchestrator_for

if TYPE_CHECKING:
    from pathlib import Path

    from mesh.contract import Result

CONCURRENCY = 8


async def test_a_worker_killed_under_load_repeats_only_its_in_flight_tasks(
    nats_url: str, tmp_path: Path
) -> None:
    topology = fault_topology(ack_wait_s=2.0)
    # Uneven lengths, so that the victim is always in the middle of some task.
    tasks = [
        Task(id=f"load-{i:03d}", prompt="x", metadata={"echo": {"sleep_s": 0.1 + (i % 7) * 0.08}})
        for i in range(150)
    ]
    async with orchestrator_for(nats_url, topology=topology) as orch:
        args = ("--concurrency", str(CONCURRENCY))
        victim = await start_worker(orch, nats_url, "victim", tmp_path, topology, *args)
        keeper = await start_worker(orch, nats_url, "keeper", tmp_path, topology, *args)
        reached = anyio.Event()
        seen = 0

        def on_result(_: Result) -> None:
            nonlocal seen
            seen += 1
            if seen == 40:
                reached.set()

        async def kill_when_busy() -> None:
            await reached.wait()
            victim.process.send_signal(signal.SIGKILL)

        try:
            async with anyio.create_task_group() as group:
                group.start_soon(kill_when_busy)
                _, results = await orch.run(tasks, timeout_s=90, on_result=on_result)
        finally:
            codes = (victim.stop(), keeper.stop())
        ledger = await read_ledger(orch.js, [t.id for t in tasks], [victim.log(), keeper.log()])

    assert codes == (-signal.SIGKILL, 0)
    assert len(results) == len(tasks)
    print(f"worker killed: {ledger.summary()}")
    # Repeated work is bounded by what the dead worker held, and shows in the attempt.
    ledger.check(max_extra_runs=CONCURRENCY)
    again = [r for r in ledger.results.values() if r.attempt > 1]
    assert 1 <= len(again) <= CONCURRENCY
    assert all(r.worker_id == "keeper" for r in again)


async def test_submitted_equals_completed_plus_dead_plus_expired_plus_errors(
    nats_url: str, tmp_path: Path
) -> None:
    topology = fault_topology(max_deliver=2)
    groups = {
        "ok": [Task(id=f"fine-{i}", prompt="x") for i in range(20)],
        "expired": [Task(id=f"stale-{i}", prompt="x", deadline=time.time() - 1) for i in range(5)]
        + [
            Task(id=f"slow-{i}", prompt="x", timeout_s=0.5, metadata={"echo": {"sleep_s": 30}})
            for i in range(5)
        ],
        "dead": [
            Task(id=f"doomed-{i}", prompt="x", metadata={"echo": {"fail": "transient"}})
            for i in range(5)
        ],
        "error": [
            Task(id=f"wrong-{i}", prompt="x", metadata={"echo": {"fail": "invalid"}})
            for i in range(5)
        ],
    }
    tasks = [task for group in groups.values() for task in group]
    async with orchestrator_for(nats_url, topology=topology) as orch:
        worker = await start_worker(
            orch, nats_url, "judge", tmp_path, topology, env={"D8_RETRY_BASE_S": "0.1"}
        )
        try:
            _, results = await orch.run(tasks, timeout_s=60)
        finally:
            code = worker.stop()
        ledger = await read_ledger(orch.js, [t.id for t in tasks], [worker.log()])

    assert code == 0
    assert len(results) == len(tasks)
    for status, group in groups.items():
        assert {results[t.id].status for t in group} == {status}, status
    assert dict(ledger.statuses) == {status: len(group) for status, group in groups.items()}
    # Dead and refused tasks are both kept as dead letters, with their reason.
    ledger.check(dead_letters=len(groups["dead"]) + len(groups["error"]))
