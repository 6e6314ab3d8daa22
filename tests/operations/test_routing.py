"""Routing by live capability: fail fast, fallback chains, and moving a dead capability's queue."""

from __future__ import annotations

import signal
from dataclasses import replace
from typing import TYPE_CHECKING

import httpx
import pytest

from mesh.contract import Task
from mesh.errors import ConfigError
from mesh.topology import TASKS_STREAM, TopologySettings
from orchestrator.http import create_app
from orchestrator.routing import Chain, RoutingSettings, UnservedError, parse_chains
from tests.helpers import (
    WorkerProcess,
    orchestrator_for,
    poll_until,
    running_worker,
    worker_settings,
)
from workers.backends import BackendSettings

if TYPE_CHECKING:
    from pathlib import Path

    from orchestrator.core import Orchestrator
    from workers.runtime import WorkerSettings

pytestmark = pytest.mark.anyio

DEEPSEEK, GROQ, GEMINI = "deepseek-coder:6.7b", "llama-3.1-8b-instant", "gemini-2.5-flash"
CHAIN = f"{DEEPSEEK}>{GROQ}>{GEMINI}"


def _serving(url: str, *models: str, **overrides: object) -> WorkerSettings:
    settings = worker_settings(url, serve_any=False, **overrides)
    return replace(settings, backend_settings=BackendSettings(models=models))


def test_routing_settings_come_from_the_environment() -> None:
    assert RoutingSettings.from_env({}) == RoutingSettings()
    assert RoutingSettings.from_env({}).move_after_s == 30.0
    settings = RoutingSettings.from_env(
        {"D8_FALLBACK": CHAIN, "D8_FAIL_UNSERVED": "0", "D8_FALLBACK_AFTER_S": "5"}
    )
    assert settings == RoutingSettings(
        chains=(Chain((DEEPSEEK, GROQ, GEMINI)),), fail_fast=False, move_after_s=5.0
    )


def test_chains_parse_from_the_variable() -> None:
    assert parse_chains(f" {CHAIN} ; a>b ") == (Chain((DEEPSEEK, GROQ, GEMINI)), Chain(("a", "b")))
    assert Chain((DEEPSEEK, GROQ, GEMINI)).after("deepseek-coder-6-7b") == (GROQ, GEMINI)
    assert parse_chains("") == ()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("llama3", "fallback chain 'llama3' needs two or more models joined by '>'"),
        ("a>>b", "fallback chain 'a>>b' needs two or more models joined by '>'"),
        ("a>:::", "model name ':::' has no letters or digits"),
    ],
)
def test_a_bad_chain_is_a_config_error_that_shows_the_form(raw: str, message: str) -> None:
    with pytest.raises(ConfigError, match="D8_FALLBACK: ") as caught:
        RoutingSettings.from_env({"D8_FALLBACK": raw})
    assert message in str(caught.value)
    assert 'D8_FALLBACK="llama3>gemini-2.5-flash"' in str(caught.value)


async def test_a_model_nobody_serves_fails_fast_with_what_is_live(nats_url: str) -> None:
    async with (
        orchestrator_for(nats_url, routing=RoutingSettings()) as orch,
        running_worker(worker_settings(nats_url, worker_id="plain")),
    ):
        await poll_until(lambda: "plain" in orch.workers, what="worker")
        with pytest.raises(UnservedError) as caught:
            await orch.submit(Task(id="nobody", prompt="x", model="llama3"))
        with pytest.raises(UnservedError):
            await orch.run(
                [Task(id="fine", prompt="x"), Task(id="no", prompt="x", model="llama3")], 5
            )
        served = await orch.submit(Task(id="served", prompt="x"))
        app = httpx.ASGITransport(app=create_app(orch))
        async with httpx.AsyncClient(transport=app, base_url="http://d8") as http:
            refused = await http.post("/tasks", json={"id": "h", "prompt": "x", "model": "llama3"})
        stored = (await orch.js.stream_info(TASKS_STREAM, subjects_filter=">")).state.subjects or {}
    assert str(caught.value) == (
        "no live worker serves model 'llama3' (chat/llama3); live capabilities: chat/any, "
        'chat/echo; start a worker for it or set D8_FALLBACK="<model>><fallback model>"'
    )
    assert caught.value.type_name == "unserved"
    assert served.subject == "tasks.chat.any"
    assert refused.status_code == 503 and refused.json()["error"]["type"] == "unserved"
    assert "tasks.chat.llama3" not in stored, "a refused task must not be queued"


async def test_a_fallback_chain_sends_the_task_to_the_first_live_capability(nats_url: str) -> None:
    routing = RoutingSettings(chains=parse_chains(f"{CHAIN}; mistral>qwen"))
    async with (
        orchestrator_for(nats_url, routing=routing) as orch,
        running_worker(_serving(nats_url, GROQ, worker_id="groq")),
        running_worker(_serving(nats_url, GEMINI, worker_id="gemini")),
    ):
        await poll_until(lambda: {"groq", "gemini"} <= set(orch.workers), what="workers")
        submitted = await orch.submit(Task(id="fb-1", prompt="x", model=DEEPSEEK))
        result = await orch.wait("fb-1", timeout_s=10)
        with pytest.raises(UnservedError, match=r"; fallbacks tried: qwen$"):
            await orch.submit(Task(id="fb-2", prompt="x", model="mistral"))
    assert submitted.subject == "tasks.chat.llama-3-1-8b-instant"
    assert result is not None and result.status == "ok"
    assert (result.capability, result.model, result.worker_id) == (
        "chat/llama-3-1-8b-instant",
        GROQ,
        "groq",
    )


async def test_queued_tasks_move_along_the_chain_after_the_last_worker_dies(
    nats_url: str, tmp_path: Path
) -> None:
    topology = TopologySettings(heartbeat_interval_s=1.0, ack_wait_s=1.0)
    routing = RoutingSettings(chains=parse_chains(CHAIN), move_after_s=1.0, check_every_s=0.5)
    env = {"D8_HEARTBEAT_S": "1", "D8_ACK_WAIT_S": "1"}
    args = ("--worker-id", "pi", "--model", DEEPSEEK, "--no-any", "--concurrency", "1")
    async with (
        orchestrator_for(nats_url, topology=topology, routing=routing) as orch,
        running_worker(_serving(nats_url, GROQ, worker_id="groq", topology=topology)),
    ):
        pi = WorkerProcess(nats_url, *args, env=env, log_path=tmp_path / "pi.log")
        try:
            await poll_until(
                lambda: {"pi", "groq"} <= set(orch.workers), timeout_s=20, what="workers"
            )
            slow = {"echo": {"sleep_s": 2}}
            tasks = [Task(id=f"q-{i}", prompt="x", model=DEEPSEEK, metadata=slow) for i in range(4)]
            submitted = await orch.submit_many(tasks)
            await poll_until(lambda: _in_flight(orch, "chat-deepseek-coder-6-7b"), what="pi busy")
            pi.process.send_signal(signal.SIGKILL)
            results = {t.id: await orch.wait(t.id, timeout_s=20) for t in tasks}
        finally:
            pi.stop()
        assert orch.router is not None
        moved = orch.router.moved
        # A worker stores the result before it acks: wait for the last ack.
        left = await poll_until(lambda: _stored(orch, 0), what="TASKS to drain")

    assert {s.subject for s in submitted} == {"tasks.chat.deepseek-coder-6-7b"}
    assert all(r is not None and r.status == "ok" for r in results.values()), results
    assert {r.capability for r in results.values() if r} == {"chat/llama-3-1-8b-instant"}
    assert moved == 4 and left


async def _stored(orch: Orchestrator, count: int) -> bool:
    return bool((await orch.js.stream_info(TASKS_STREAM)).state.messages == count)


async def _in_flight(orch: Orchestrator, consumer: str) -> bool:
    info = await orch.js.consumer_info(TASKS_STREAM, consumer)
    return bool(info.num_ack_pending == 1 and info.num_pending == 3)
