"""One worker in this process: round trip, bad input, duplicates, deadlines, retries."""

from __future__ import annotations

import time

import nats
import pytest

from mesh.contract import Message, Options, Result, Task
from mesh.results import DeadLetter, get_result
from mesh.topology import DEAD_STREAM, TASKS_STREAM, TopologySettings
from tests.helpers import orchestrator_for, poll_until, running_worker, worker_settings

pytestmark = pytest.mark.anyio


async def test_a_task_round_trips_with_its_metadata(nats_url: str) -> None:
    async with (
        orchestrator_for(nats_url) as orch,
        running_worker(worker_settings(nats_url)) as worker,
    ):
        task = Task(id="rt-1", prompt="mutate this prompt", metadata={"agent": "a1", "gen": 3})
        submitted = await orch.submit(task)
        result = await orch.wait(task.id, timeout_s=10)

    assert submitted.subject == "tasks.chat.any"
    assert not submitted.duplicate
    assert result is not None
    assert (result.status, result.output) == ("ok", "echo: mutate this prompt")
    assert result.metadata == {"agent": "a1", "gen": 3}
    assert (result.worker_id, result.backend, result.model, result.attempt) == (
        worker.worker_id,
        "echo",
        "echo",
        1,
    )
    assert result.usage.prompt_tokens == 3
    assert result.timings.total_ms >= result.timings.run_ms >= 0


async def test_a_task_for_a_named_model_goes_to_that_models_queue(nats_url: str) -> None:
    settings = worker_settings(nats_url, serve_any=False)
    settings = settings.__class__(
        **{
            **settings.__dict__,
            "backend_settings": settings.backend_settings.__class__(
                models=("deepseek-coder:6.7b",)
            ),
        }
    )
    async with orchestrator_for(nats_url) as orch, running_worker(settings):
        task = Task(
            id="m-1",
            messages=[Message(role="user", content="hi")],
            model="deepseek-coder:6.7b",
            options=Options(temperature=0.2, max_tokens=10, stop=["\n"], seed=1),
        )
        submitted = await orch.submit(task)
        result = await orch.wait(task.id, timeout_s=10)
    assert submitted.subject == "tasks.chat.deepseek-coder-6-7b"
    assert result is not None and (result.status, result.model) == ("ok", "deepseek-coder:6.7b")


async def test_a_malformed_task_becomes_a_dead_letter_and_an_error_result(nats_url: str) -> None:
    async with (
        orchestrator_for(nats_url) as orch,
        running_worker(worker_settings(nats_url)) as worker,
    ):
        nc = await nats.connect(nats_url)
        js = nc.jetstream()
        try:
            await js.publish(
                "tasks.chat.any", b'{"id": "bad-1", "prompt": 42}', headers={"Nats-Msg-Id": "bad-1"}
            )
            await js.publish("tasks.chat.any", b"\xff not json", headers={"Nats-Msg-Id": "no-id!"})
            result = await orch.wait("bad-1", timeout_s=10)
            assert result is not None and result.status == "error"
            assert result.error is not None and result.error.type == "invalid_task"
            assert "Expected `str | null`, got `int` - at `$.prompt`" in result.error.message

            dead = await poll_until(
                lambda: _stream_messages(js, DEAD_STREAM, 2), what="two dead letters"
            )
            first = await js.get_msg(DEAD_STREAM, 1)
            assert first.subject == "dead.chat.any"
            assert first.data == b'{"id": "bad-1", "prompt": 42}'
            assert first.headers[DeadLetter.TASK_ID] == "bad-1"
            assert "invalid task" in first.headers[DeadLetter.REASON]
            assert dead == 2

            # The worker keeps serving.
            await orch.submit(Task(id="after-bad", prompt="still here?"))
            after = await orch.wait("after-bad", timeout_s=10)
            assert (
                after is not None and after.status == "ok" and after.worker_id == worker.worker_id
            )
            # The ack follows the result write; wait for it to reach the server.
            await poll_until(lambda: _stream_messages_equal(js, TASKS_STREAM, 0), what="ack")
        finally:
            await nc.close()


async def _stream_messages(js: object, stream: str, at_least: int) -> int | None:
    count: int = (await js.stream_info(stream)).state.messages  # type: ignore[attr-defined]
    return count if count >= at_least else None


async def _stream_messages_equal(js: object, stream: str, count: int) -> bool:
    info = await js.stream_info(stream)  # type: ignore[attr-defined]
    return bool(info.state.messages == count)


async def test_a_duplicate_submit_is_not_run_twice(nats_url: str) -> None:
    async with (
        orchestrator_for(nats_url) as orch,
        running_worker(worker_settings(nats_url)) as worker,
    ):
        task = Task(id="dup-1", prompt="once")
        first = await orch.submit(task)
        await orch.wait(task.id, timeout_s=10)
        second = await orch.submit(task)
        submitted, results = await orch.run([task], timeout_s=10)

    assert (first.duplicate, second.duplicate, submitted[0].duplicate) == (False, True, True)
    assert first.stream_seq == second.stream_seq
    assert results["dup-1"].attempt == 1
    assert worker.completed == 1


async def test_a_task_past_its_deadline_is_not_run(nats_url: str) -> None:
    async with (
        orchestrator_for(nats_url) as orch,
        running_worker(worker_settings(nats_url)) as worker,
    ):
        await orch.submit(Task(id="late", prompt="x", deadline=time.time() - 1))
        result = await orch.wait("late", timeout_s=10)
    assert result is not None and result.status == "expired"
    assert result.error is not None and "while queued" in result.error.message
    assert worker.completed == 0


async def test_a_task_whose_deadline_passes_while_running_is_cancelled(nats_url: str) -> None:
    async with orchestrator_for(nats_url) as orch, running_worker(worker_settings(nats_url)):
        task = Task(id="slow", prompt="x", timeout_s=0.5, metadata={"echo": {"sleep_s": 30}})
        await orch.submit(task)
        result = await orch.wait("slow", timeout_s=10)
    assert result is not None and result.status == "expired"
    assert result.error is not None and "while running" in result.error.message


async def test_a_retryable_failure_is_retried_then_succeeds(nats_url: str) -> None:
    async with (
        orchestrator_for(nats_url) as orch,
        running_worker(worker_settings(nats_url)) as worker,
    ):
        worker._runner._retry = worker._runner._retry.__class__(max_deliver=5, base_delay_s=0.05)  # type: ignore[union-attr]
        task = Task(
            id="flaky", prompt="x", metadata={"echo": {"fail": "transient", "fail_times": 2}}
        )
        await orch.submit(task)
        result = await orch.wait("flaky", timeout_s=10)
    assert result is not None and (result.status, result.attempt) == ("ok", 3)


async def test_a_task_that_always_fails_ends_dead_after_max_deliveries(nats_url: str) -> None:
    topology = TopologySettings(heartbeat_interval_s=1.0, max_deliver=3)
    async with orchestrator_for(nats_url, topology=topology) as orch:
        async with running_worker(worker_settings(nats_url, topology=topology)) as worker:
            worker._runner._retry = worker._runner._retry.__class__(
                max_deliver=3, base_delay_s=0.05
            )  # type: ignore[union-attr]
            await orch.submit(
                Task(id="doomed", prompt="x", metadata={"echo": {"fail": "transient"}})
            )
            result = await orch.wait("doomed", timeout_s=10)
        assert result is not None and (result.status, result.attempt) == ("dead", 3)
        assert result.error is not None and "gave up after 3 attempts" in result.error.message
        dead = await orch.js.get_msg(DEAD_STREAM, 1)
        assert dead.headers[DeadLetter.ATTEMPTS] == "3"
        assert await get_result(orch.js, "doomed") == result


@pytest.mark.parametrize("model", ["other-model", "m.x"])
async def test_a_task_for_a_model_this_worker_does_not_serve_is_an_error(
    nats_url: str, model: str
) -> None:
    async with orchestrator_for(nats_url) as orch, running_worker(worker_settings(nats_url)):
        nc = await nats.connect(nats_url)
        try:
            body = b'{"id": "wrong-model", "prompt": "x", "model": "%s"}' % model.encode()
            await nc.jetstream().publish("tasks.chat.any", body)
        finally:
            await nc.close()
        result = await orch.wait("wrong-model", timeout_s=10)
    assert result is not None and result.status == "error"
    assert result.error is not None and "is not served by this worker" in result.error.message


async def test_an_id_reused_after_the_duplicate_window_gets_the_stored_result(
    nats_url: str,
) -> None:
    topology = TopologySettings(heartbeat_interval_s=1.0, duplicate_window_s=1.0)
    async with (
        orchestrator_for(nats_url, topology=topology) as orch,
        running_worker(worker_settings(nats_url, topology=topology)),
    ):
        _, first = await orch.run([Task(id="reuse", prompt="FIRST")], timeout_s=10)

        async def run_anew() -> Result | None:
            # Within the window the submit is dropped as a duplicate: harmless to repeat.
            submitted, results = await orch.run([Task(id="reuse", prompt="SECOND")], 5)
            return None if submitted[0].duplicate else results.get("reuse")

        again = await poll_until(run_anew, timeout_s=15, interval_s=0.2, what="a run anew")
        stored = await get_result(orch.js, "reuse")

    assert first["reuse"].output == "echo: FIRST"
    assert again == stored == first["reuse"], "the caller sees the one stored result"


@pytest.mark.parametrize("damage", ["deleted", "junk"])
async def test_a_result_deleted_or_overwritten_by_hand_gives_way_to_a_new_run(
    nats_url: str, damage: str
) -> None:
    # `nats kv del results ID` (or a stray `nats kv put`) then the id submitted again.
    topology = TopologySettings(heartbeat_interval_s=1.0, duplicate_window_s=1.0)
    async with (
        orchestrator_for(nats_url, topology=topology) as orch,
        running_worker(worker_settings(nats_url, topology=topology)),
    ):
        await orch.run([Task(id="redo", prompt="FIRST")], timeout_s=10)
        results = await orch.js.key_value("results")
        if damage == "deleted":
            await results.delete("redo")
        else:
            await results.put("redo", b"junk")

        async def run_anew() -> Result | None:
            submitted, done = await orch.run([Task(id="redo", prompt="SECOND")], 5)
            return None if submitted[0].duplicate else done.get("redo")

        again = await poll_until(run_anew, timeout_s=15, interval_s=0.2, what="a run anew")
        stored = await get_result(orch.js, "redo")

    assert again is not None and again.output == "echo: SECOND"
    assert stored == again
