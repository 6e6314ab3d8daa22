"""SIGTERM: stop fetching, finish what fits in the grace period, hand the rest back at once."""

from __future__ import annotations

import signal
import time
from typing import TYPE_CHECKING

import anyio

from mesh.contract import Task
from mesh.topology import TASKS_STREAM
from tests.faults.helpers import consumer_info, fault_topology, start_worker
from tests.faults.ledger import read_ledger
from tests.helpers import orchestrator_for, poll_until

if TYPE_CHECKING:
    from pathlib import Path

    from mesh.server import EmbeddedServer
    from orchestrator.core import Orchestrator


async def _gone_within(orch: Orchestrator, worker_id: str, timeout_s: float) -> bool:
    with anyio.move_on_after(timeout_s):
        while worker_id in orch.workers:
            await orch.workers_changed.wait()
    return worker_id not in orch.workers


async def _ack_pending(orch: Orchestrator, count: int) -> bool:
    return (await consumer_info(orch)).num_ack_pending == count


async def test_sigterm_hands_back_unfinished_tasks_at_once(nats_url: str, tmp_path: Path) -> None:
    # A lease far longer than the test: a task back in the queue came back by a nak.
    topology = fault_topology(ack_wait_s=60.0)
    quick = Task(id="quick", prompt="x", metadata={"echo": {"sleep_s": 1.5}})
    long = Task(id="long", prompt="x", metadata={"echo": {"sleep_s": 4.0}})
    queued = [Task(id=f"queued-{i}", prompt="x") for i in range(2)]
    async with orchestrator_for(nats_url, topology=topology) as orch:
        leaving = await start_worker(
            orch, nats_url, "leaving", tmp_path, topology, "--concurrency", "2", "--grace-s", "3"
        )
        try:
            await orch.submit_many([quick, long])
            await poll_until(lambda: _ack_pending(orch, 2), what="both tasks to be taken")
            # Both slots are busy, so these wait in the queue.
            await orch.submit_many(queued)
            leaving.process.send_signal(signal.SIGTERM)
            sigterm_at = time.time()
            code = await anyio.to_thread.run_sync(leaving.process.wait, 30)
        finally:
            leaving.stop()
        # Right after exit: the queued two were never delivered although a slot freed up
        # when `quick` finished, and all three wait in the stream.
        info = await consumer_info(orch)
        left = (await orch.js.stream_info(TASKS_STREAM)).state.messages
        # The worker deleted its heartbeat before exiting; the watch hears of it within
        # moments, not after the TTL (3 s here would be the expiry, so 2 s tells them apart).
        gone = await _gone_within(orch, "leaving", 2.0)

        heir = await start_worker(orch, nats_url, "heir", tmp_path, topology)
        try:
            for task in [long, *queued]:
                assert await orch.wait(task.id, timeout_s=30) is not None
        finally:
            heir_code = heir.stop()
        ids = [t.id for t in [quick, long, *queued]]
        ledger = await read_ledger(orch.js, ids, [leaving.log(), heir.log()])

    assert (code, heir_code) == (0, 0)
    assert (info.delivered.consumer_seq, left) == (2, 3)
    assert gone, "the heartbeat outlived the worker"
    assert "grace over, handing back tasks worker_id=leaving count=1" in leaving.log()
    ledger.check()
    placed = {r.id: (r.worker_id, r.attempt) for r in ledger.results.values()}
    assert placed == {
        "quick": ("leaving", 1),
        "long": ("heir", 2),  # the nak counted as a delivery
        "queued-0": ("heir", 1),
        "queued-1": ("heir", 1),
    }
    # Handed back by a nak, not by the lease running out: well inside the 60 s ack wait.
    assert ledger.results["long"].finished_at - sigterm_at < 30


async def test_sigterm_while_the_server_is_gone_exits_cleanly(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    topology = fault_topology(ack_wait_s=60.0)
    async with orchestrator_for(nats_server.url, topology=topology) as orch:
        worker = await start_worker(orch, nats_server.url, "orphan", tmp_path, topology)
        try:
            nats_server.kill()
            await poll_until(lambda: "nats disconnected" in worker.log(), what="the worker to see")
            worker.process.send_signal(signal.SIGTERM)
            code = await anyio.to_thread.run_sync(worker.process.wait, 30)
        finally:
            worker.stop()
    log = worker.log()
    assert code == 0, log
    assert "Traceback" not in log and "worker stopped worker_id=orphan" in log, log
    # Reconnect attempts twice a second, but the refusal is logged once.
    assert log.count("Connect call failed") <= 1, log
