"""Status figures, `/status` and `/metrics` agree with what JetStream itself reports."""

from __future__ import annotations

import httpx
import nats
import pytest

from mesh.contract import Task
from mesh.topology import DEAD_STREAM, TASKS_STREAM, Capability
from orchestrator.http import create_app
from orchestrator.status import StatusCollector
from tests.helpers import orchestrator_for, poll_until, running_worker, worker_settings

pytestmark = pytest.mark.anyio

PARKED = Capability("chat", "nobody-serves-this")


async def _in_flight(js: object, consumer: str, count: int) -> bool:
    info = await js.consumer_info(TASKS_STREAM, consumer)  # type: ignore[attr-defined]
    return bool(info.num_ack_pending == count)


async def test_status_figures_equal_jetstreams_own_counts(nats_url: str) -> None:
    settings = worker_settings(nats_url, worker_id="w-status")
    async with orchestrator_for(nats_url) as orch, running_worker(settings):
        await poll_until(lambda: "w-status" in orch.workers, what="heartbeat")
        http = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_app(orch)), base_url="http://d8"
        )
        async with http:
            await orch.submit_many(
                Task(id=f"parked-{i}", prompt="x", model="nobody-serves-this") for i in range(3)
            )
            await orch.submit(Task(id="slow", prompt="x", metadata={"echo": {"sleep_s": 2}}))
            nc = await nats.connect(nats_url)
            try:
                bad = {"Nats-Msg-Id": "bad"}
                await nc.jetstream().publish("tasks.chat.any", b"not json", headers=bad)
                # A kind no worker serves: stored, read by no consumer.
                await nc.jetstream().publish("tasks.embed.any", b'{"id": "e1", "prompt": "x"}')
            finally:
                await nc.close()
            await poll_until(lambda: _in_flight(orch.js, "chat-any", 1), what="slow task running")
            await poll_until(lambda: _dead_count(orch.js, 1), what="the dead letter")

            collector = StatusCollector(orch.js)
            snapshot = await collector.collect()
            consumers = {c.name: c for c in await orch.js.consumers_info(TASKS_STREAM)}
            dead = await orch.js.stream_info(DEAD_STREAM, subjects_filter="dead.>")
            tasks = await orch.js.stream_info(TASKS_STREAM, subjects_filter="tasks.>")

            metrics = (await http.get("/metrics")).text
            status = (await http.get("/status")).json()
            page = await http.get("/dashboard")

            result = await orch.wait("slow", timeout_s=10)
            later = await collector.collect()

    queues = {q.consumer: q for q in snapshot.queues}
    assert set(queues) == set(consumers) == {"chat-any", "chat-echo", PARKED.consumer}
    for name, info in consumers.items():
        figures = queues[name]
        assert (figures.pending, figures.in_flight, figures.redelivered, figures.waiting) == (
            info.num_pending,
            info.num_ack_pending,
            info.num_redelivered,
            info.num_waiting,
        )
        dead_subject = "dead." + figures.capability.replace("/", ".")
        assert figures.dead == (dead.state.subjects or {}).get(dead_subject, 0)
    assert (queues[PARKED.consumer].pending, queues[PARKED.consumer].workers) == (3, 0)
    chat_any = queues["chat-any"]
    assert (chat_any.in_flight, chat_any.dead, chat_any.workers) == (1, 1, 1)
    assert snapshot.tasks_stored == tasks.state.messages == 5
    # nats stream subjects TASKS, less the subjects the consumers filter on
    assert (
        snapshot.unread
        == {"tasks.embed.any": 1}
        == {s: n for s, n in (tasks.state.subjects or {}).items() if s == "tasks.embed.any"}
    )
    assert snapshot.dead_total == dead.state.messages == 1
    assert [w.worker_id for w in snapshot.workers] == ["w-status"]
    assert snapshot.recent_failures[0].error_type == "invalid_task"
    assert "invalid task" in snapshot.recent_failures[0].reason

    # A second look measures what finished in between.
    assert result is not None and result.status == "ok" and result.capability == "chat/any"
    any_later = next(q for q in later.queues if q.consumer == "chat-any")
    assert any_later.done is not None and any_later.done >= 1 and any_later.rate is not None

    assert 'd8_queue_pending{capability="chat/nobody-serves-this"} 3.0' in metrics
    assert 'd8_queue_in_flight{capability="chat/any"} 1.0' in metrics
    assert 'd8_queue_dead{capability="chat/any"} 1.0' in metrics
    assert "d8_workers_alive 1.0" in metrics
    assert 'results_total{backend="echo",capability="chat/any",status="error"} 1.0' in metrics
    assert status["workers"][0]["worker_id"] == "w-status"
    assert page.status_code == 200 and "<title>d8-mesh</title>" in page.text


async def test_metrics_count_outcomes_durations_and_tokens(nats_url: str) -> None:
    async with orchestrator_for(nats_url) as orch, running_worker(worker_settings(nats_url)):
        http = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_app(orch)), base_url="http://d8"
        )
        async with http:
            _, results = await orch.run([Task(id=f"m-{i}", prompt="one two") for i in range(5)], 10)
            assert len(results) == 5
            await poll_until(lambda: _metric_has(http, "d8_task_results_total"), what="counted")
            text = (await http.get("/metrics")).text
    assert 'd8_task_results_total{backend="echo",capability="chat/any",status="ok"} 5.0' in text
    assert 'd8_task_duration_seconds_count{capability="chat/any"} 5.0' in text
    assert 'd8_tokens_total{backend="echo",kind="prompt"} 10.0' in text


async def _metric_has(http: httpx.AsyncClient, name: str) -> bool:
    return name + "{" in (await http.get("/metrics")).text


async def _dead_count(js: object, count: int) -> bool:
    info = await js.stream_info(DEAD_STREAM)  # type: ignore[attr-defined]
    return bool(info.state.messages == count)
