"""A task that kills every worker that takes it ends as a dead letter and a `dead` result."""

from __future__ import annotations

import functools
import signal
from typing import TYPE_CHECKING

import nats.errors
import pytest

from mesh.contract import Result, Task, encode
from mesh.results import DeadLetter, get_result, write_result_once
from mesh.topology import DEAD_STREAM, TASKS_STREAM, max_deliveries_advisory_subject
from orchestrator.dead_letters import MAX_DELIVERIES_TYPE
from tests.faults.helpers import CONSUMER, consumer_info, fault_topology, start_worker
from tests.faults.ledger import read_ledger
from tests.helpers import orchestrator_for, poll_until

if TYPE_CHECKING:
    from pathlib import Path

    from orchestrator.core import Orchestrator


async def _delivered(orch: Orchestrator, count: int) -> bool:
    info = await consumer_info(orch)
    return info.delivered.consumer_seq >= count and info.num_ack_pending == 1


async def test_a_task_that_crashes_every_worker_becomes_a_dead_letter(
    nats_url: str, tmp_path: Path
) -> None:
    topology = fault_topology(ack_wait_s=1.0, max_deliver=2)
    poison = Task(id="poison", prompt="x", metadata={"echo": {"sleep_s": 30.0}, "agent": "a7"})
    healthy = Task(id="healthy", prompt="x")
    async with orchestrator_for(nats_url, topology=topology) as orch:
        await orch.submit(poison)
        logs = []
        for attempt in (1, 2):  # each worker that takes it dies (OOM on a Pi, say)
            victim = await start_worker(
                orch, nats_url, f"victim-{attempt}", tmp_path, topology, "--concurrency", "1"
            )
            try:
                await poll_until(
                    functools.partial(_delivered, orch, attempt), what=f"delivery {attempt}"
                )
                victim.process.send_signal(signal.SIGKILL)
            finally:
                victim.stop()
            logs.append(victim.log())

        # JetStream sends the advisory when it next tries to deliver on the consumer, so
        # when a worker asks for work; that worker never sees the task.
        survivor = await start_worker(orch, nats_url, "survivor", tmp_path, topology)
        try:
            result = await orch.wait(poison.id, timeout_s=20)
            await orch.submit(healthy)
            assert await orch.wait(healthy.id, timeout_s=20) is not None
        finally:
            survivor.stop()
        dead = await orch.js.get_msg(DEAD_STREAM, 1)
        ledger = await read_ledger(orch.js, [poison.id, healthy.id], [*logs, survivor.log()])
        handled = orch.dead_letters.handled if orch.dead_letters else 0

    assert result is not None and (result.status, result.attempt) == ("dead", 2)
    assert result.error is not None and result.error.type == MAX_DELIVERIES_TYPE
    assert "no worker settled it in 2 deliveries" in result.error.message
    assert result.metadata["agent"] == "a7"
    assert dead.subject == "dead.chat.any" and dead.data is not None
    assert b'"id":"poison"' in dead.data
    assert dead.headers is not None
    assert dead.headers[DeadLetter.TASK_ID] == "poison"
    assert dead.headers[DeadLetter.ATTEMPTS] == "2"
    assert dead.headers[DeadLetter.ERROR_TYPE] == MAX_DELIVERIES_TYPE
    assert "crashed or lost its lease" in dead.headers[DeadLetter.REASON]
    assert handled == 1
    assert "task_id=poison" not in survivor.log()
    ledger.check(dead_letters=1)
    assert (ledger.statuses["dead"], ledger.statuses["ok"]) == (1, 1)


async def test_the_dead_letter_handler_spares_finished_tasks_and_keeps_nameless_ones(
    nats_url: str,
) -> None:
    async with orchestrator_for(nats_url) as orch:
        assert orch.dead_letters is not None
        js = orch.js
        finished = await js.publish("tasks.chat.any", encode(Task(id="finished", prompt="x")))
        await write_result_once(js, Result(id="finished", status="ok", output="done"))
        nameless = await js.publish("tasks.chat.any", b"\x00 not a task")

        spared = await orch.dead_letters.handle(finished.seq, 5, CONSUMER)
        kept = await orch.dead_letters.handle(nameless.seq, 5, CONSUMER)
        again = await orch.dead_letters.handle(nameless.seq, 5, CONSUMER)
        letter = await js.get_msg(DEAD_STREAM, 1)
        tasks_left = (await js.stream_info(TASKS_STREAM)).state.messages
        dead_letters = (await js.stream_info(DEAD_STREAM)).state.messages
        stored = await get_result(js, "finished")

    # A task whose result exists (its ack was lost) is removed, not mourned.
    assert (spared, kept, again) == (False, True, False)
    assert stored is not None and stored.status == "ok"
    assert (tasks_left, dead_letters) == (0, 1)
    assert letter.data == b"\x00 not a task"
    assert letter.headers is not None and DeadLetter.TASK_ID not in letter.headers


async def test_a_missed_advisory_is_made_up_for_when_the_orchestrator_starts(
    nats_url: str,
) -> None:
    topology = fault_topology(ack_wait_s=1.0, max_deliver=2)
    async with orchestrator_for(nats_url, topology=topology) as orch:
        assert orch.dead_letters is not None
        await orch.dead_letters.stop()  # the orchestrator is down from here on
        heard = await orch.nc.subscribe(max_deliveries_advisory_subject())
        await orch.submit(Task(id="orphan", prompt="x"))
        # A client that takes the task twice and dies each time, then asks once more:
        # JetStream gives up and sends the advisory, which nobody handles.
        puller = await orch.js.pull_subscribe_bind(CONSUMER, stream=TASKS_STREAM)
        for attempt in (1, 2):  # the second comes once the first lease ran out
            taken = await puller.fetch(1, timeout=5)  # never acked
            assert taken[0].metadata.num_delivered == attempt
        with pytest.raises(nats.errors.TimeoutError):
            await puller.fetch(1, timeout=2)
        await heard.next_msg(timeout=5)
        await heard.unsubscribe()
        await puller.unsubscribe()
        missed = await orch.result("orphan")

        await orch.dead_letters.start()  # as at the orchestrator's next start
        result = await orch.result("orphan")
        tasks_left = (await orch.js.stream_info(TASKS_STREAM)).state.messages

    assert missed is None
    assert result is not None and (result.status, result.attempt) == ("dead", 2)
    assert tasks_left == 0
