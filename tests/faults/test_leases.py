"""Leases: a long task is kept by its live worker, and a racing second attempt stores nothing."""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING

import anyio

from mesh.contract import Task
from tests.faults.helpers import consumer_info, fault_topology, start_worker
from tests.faults.ledger import read_ledger
from tests.helpers import orchestrator_for, poll_until

if TYPE_CHECKING:
    from pathlib import Path

    from orchestrator.core import Orchestrator


async def _ack_pending(orch: Orchestrator, count: int) -> bool:
    return (await consumer_info(orch)).num_ack_pending == count


async def test_a_long_task_is_not_redelivered_while_its_worker_lives(
    nats_url: str, tmp_path: Path
) -> None:
    # Each task runs 4 ack waits; only the worker's in-progress acks keep it from a rival.
    topology = fault_topology(ack_wait_s=1.5)
    tasks = [
        Task(id=f"long-{i}", prompt="x", metadata={"echo": {"sleep_s": 6.0}}) for i in range(3)
    ]
    async with orchestrator_for(nats_url, topology=topology) as orch:
        slow = await start_worker(orch, nats_url, "slow", tmp_path, topology, "--concurrency", "3")
        rival = None
        try:
            await orch.submit_many(tasks)
            await poll_until(
                lambda: _ack_pending(orch, 3), what="the slow worker to take all three"
            )
            # The rival polls the same consumer for the rest of the run.
            rival = await start_worker(orch, nats_url, "rival", tmp_path, topology)
            for task in tasks:
                assert await orch.wait(task.id, timeout_s=30) is not None
        finally:
            codes = [slow.stop()] + ([rival.stop()] if rival else [])
        info = await consumer_info(orch)
        ledger = await read_ledger(
            orch.js, [t.id for t in tasks], [slow.log(), rival.log() if rival else ""]
        )

    ledger.check()
    assert codes == [0, 0]
    assert {(r.worker_id, r.attempt, r.status) for r in ledger.results.values()} == {
        ("slow", 1, "ok")
    }
    assert (info.num_redelivered, info.delivered.consumer_seq) == (0, 3), (
        "a long task was redelivered"
    )
    assert "task " not in rival.log() if rival else True


async def test_racing_attempts_store_one_result(nats_url: str, tmp_path: Path) -> None:
    # A worker frozen (SIGSTOP, like a Pi deep in swap) loses its lease; a second worker
    # runs the redelivery; the frozen one wakes and finishes too. One result is stored.
    topology = fault_topology(ack_wait_s=1.0)
    task = Task(id="raced", prompt="x", metadata={"echo": {"sleep_s": 2.0}})
    async with orchestrator_for(nats_url, topology=topology) as orch:
        # One slot: while it runs the task, it asks for nothing, so the redelivery goes to
        # the other worker.
        frozen = await start_worker(
            orch, nats_url, "frozen", tmp_path, topology, "--concurrency", "1"
        )
        other = None
        try:
            await orch.submit(task)
            await poll_until(lambda: _ack_pending(orch, 1), what="the first worker to take it")
            frozen.process.send_signal(signal.SIGSTOP)
            other = await start_worker(orch, nats_url, "other", tmp_path, topology)
            await poll_until(lambda: _delivered(orch, 2), timeout_s=20, what="the redelivery")
            frozen.process.send_signal(signal.SIGCONT)
            first = await orch.wait(task.id, timeout_s=20)
            # Both attempts end: each one logs its outcome.
            await poll_until(
                lambda: "task_id=raced" in frozen.log() and "task_id=raced" in other.log(),
                timeout_s=20,
                what="both attempts to finish",
            )
        finally:
            frozen.process.send_signal(signal.SIGCONT)
            codes = [frozen.stop()] + ([other.stop()] if other else [])
        ledger = await read_ledger(orch.js, [task.id], [frozen.log(), other.log() if other else ""])

    assert codes == [0, 0]
    assert first is not None and ledger.results[task.id] == first
    # Both attempts ran (the lease was really lost), and the bucket took one write; the
    # attempt that lost says so instead of claiming the task.
    ledger.check(max_extra_runs=1)
    assert ledger.runs[task.id] == 2
    assert "task late task_id=raced" in frozen.log() + other.log()


async def test_a_stalled_worker_does_not_run_its_own_redelivered_task_again(
    nats_url: str, tmp_path: Path
) -> None:
    topology = fault_topology(ack_wait_s=1.0)
    task = Task(id="stalled", prompt="x", metadata={"echo": {"sleep_s": 2.0}})
    async with orchestrator_for(nats_url, topology=topology) as orch:
        # Free slots: its own pull request is waiting when the lease runs out.
        worker = await start_worker(orch, nats_url, "stalled", tmp_path, topology)
        try:
            await orch.submit(task)
            await poll_until(lambda: _ack_pending(orch, 1), what="the worker to take it")
            # ...and to ask for more on that consumer, so the redelivery can come back to it.
            await poll_until(lambda: _waiting(orch), what="its next pull request")
            worker.process.send_signal(signal.SIGSTOP)
            await poll_until(lambda: _delivered(orch, 2), timeout_s=20, what="the redelivery")
            worker.process.send_signal(signal.SIGCONT)
            result = await orch.wait(task.id, timeout_s=20)
        finally:
            worker.process.send_signal(signal.SIGCONT)
            code = worker.stop()
        ledger = await read_ledger(orch.js, [task.id], [worker.log()])

    assert code == 0
    assert result is not None and (result.worker_id, result.attempt) == ("stalled", 1)
    ledger.check()
    assert "redelivery of a task running here ignored" in worker.log()


async def _waiting(orch: Orchestrator) -> bool:
    return (await consumer_info(orch)).num_waiting >= 1


async def _delivered(orch: Orchestrator, count: int) -> bool:
    return (await consumer_info(orch)).delivered.consumer_seq >= count


async def test_concurrent_duplicate_submits_store_and_run_each_task_once(
    nats_url: str, tmp_path: Path
) -> None:
    topology = fault_topology()
    tasks = [Task(id=f"twin-{i}", prompt=f"p{i}") for i in range(20)]
    async with orchestrator_for(nats_url, topology=topology) as orch:
        worker = await start_worker(orch, nats_url, "w", tmp_path, topology)
        try:
            async with anyio.create_task_group() as group:
                for _ in range(5):  # five clients submit the same twenty tasks at once
                    group.start_soon(orch.submit_many, tasks)
            for task in tasks:
                assert await orch.wait(task.id, timeout_s=20) is not None
        finally:
            code = worker.stop()
        stream = await orch.js.stream_info("TASKS")
        ledger = await read_ledger(orch.js, [t.id for t in tasks], [worker.log()])

    assert code == 0
    ledger.check()
    assert stream.state.last_seq == 20, "a duplicate submit was stored"
    assert sum(ledger.runs.values()) == 20
