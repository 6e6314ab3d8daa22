"""A Raspberry Pi's leaf node linked to the hub, both from the shipped configs.

A real `d8 worker` process on the leaf (D8_JS_DOMAIN=hub, worker credentials, as compose
runs it) consumes tasks published at the hub and writes results and heartbeats into the
hub's buckets through the leaf's subject mappings.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

import anyio
import nats
import nats.errors
import pytest
from nats.js.errors import NoStreamResponseError

from mesh.connection import ConnectionSettings
from mesh.contract import Task
from mesh.health import HealthOptions, run_checks
from mesh.topology import TASKS_STREAM, Capability, TopologySettings, declare_capability
from orchestrator.core import Orchestrator, OrchestratorSettings
from tests.deploy.nats_configs import ADMIN, PASSWORDS, hub_and_leaf
from tests.helpers import ROOT, WorkerProcess, poll_until

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

TOPOLOGY = TopologySettings(heartbeat_interval_s=1.0)
WORKER_ID = "pi-test-echo"


def _worker_env(leaf_url: str) -> dict[str, str]:
    # What compose's worker-ollama service sets, with the echo backend instead of Ollama.
    return {
        "NATS_URL": leaf_url,
        "NATS_USER": "worker",
        "NATS_PASSWORD": PASSWORDS["D8_WORKER_PASSWORD"],
        "NATS_INBOX_PREFIX": "_INBOX_worker",
        "D8_JS_DOMAIN": "hub",
        "D8_WORKER_ID": WORKER_ID,
        "D8_HEARTBEAT_S": "1",
    }


def _orchestrator(hub_url: str) -> Orchestrator:
    connection = ConnectionSettings(
        servers=(hub_url,),
        user="orchestrator",
        password=PASSWORDS["D8_ORCHESTRATOR_PASSWORD"],
        inbox_prefix="_INBOX_orchestrator",
    )
    return Orchestrator(OrchestratorSettings(connection=connection, topology=TOPOLOGY))


async def test_worker_on_leaf_consumes_tasks_published_at_hub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with hub_and_leaf(tmp_path, monkeypatch) as (hub, leaf):
        async with _orchestrator(hub.url) as orchestrator:
            # What `d8 orchestrator` does for D8_MODELS=echo: the worker may not create it.
            await declare_capability(
                orchestrator.js, Capability.for_model("echo"), TOPOLOGY, update=True
            )
            env = _worker_env(leaf.url)
            worker = WorkerProcess(
                leaf.url, "--backend", "echo", env=env, log_path=tmp_path / "worker.log"
            )
            try:
                await poll_until(
                    lambda: WORKER_ID in orchestrator.workers,
                    timeout_s=20,
                    what=f"the leaf worker's heartbeat at the hub\n{worker.log()}",
                )
                tasks = [
                    Task(id="leaf-1", prompt="hello from the hub"),
                    Task(id="leaf-2", prompt="stream it", model="echo", stream=True),
                ]
                _, results = await orchestrator.run(tasks, timeout_s=15)
                assert {r.status for r in results.values()} == {"ok"}, results
                assert results["leaf-1"].output == "echo: hello from the hub"
                assert {r.worker_id for r in results.values()} == {WORKER_ID}

                async def tasks_left() -> bool:
                    # Acks follow the result writes: wait for them to empty the work queue.
                    info = await orchestrator.js.stream_info(TASKS_STREAM)
                    return info.state.messages == 0

                await poll_until(tasks_left, what="acks through the leaf")

                # The container health check, run the way Docker runs it, through the leaf.
                with anyio.fail_after(30):
                    health = await anyio.run_process(
                        [sys.executable, "-m", "mesh.cli", "health", "--role", "worker"],
                        env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
                        check=False,
                    )
                output = health.stdout.decode() + health.stderr.decode()
                assert health.returncode == 0, output
                assert f"worker_id={WORKER_ID}" in output
            finally:
                assert worker.stop() == 0, worker.log()
            # The goodbye (a KV delete) crosses the leaf too: the hub sees the worker leave.
            await poll_until(lambda: WORKER_ID not in orchestrator.workers, what="worker gone")
    assert "Violation" not in (tmp_path / "hub.log").read_text()
    assert "Violation" not in (tmp_path / "leaf.log").read_text()


async def test_leaf_health_follows_its_link_to_the_hub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with hub_and_leaf(tmp_path, monkeypatch) as (hub, leaf):
        options = HealthOptions(
            role="nats",
            connection=ConnectionSettings(),
            monitor_url=f"{leaf.monitor_url}/healthz",
            leaf_link=True,
            timeout_s=2,
        )
        assert all(check.ok for check in await run_checks(options))
        hub.stop()

        async def link_down() -> bool:
            checks = await run_checks(options)
            return [c.ok for c in checks] == [True, False]

        await poll_until(link_down, what="the leaf to notice the hub is gone")


async def test_compromised_leaf_cannot_inject_tasks_into_the_hub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Even a superuser on the Pi's own server is bound by the hub's `leaf` user.
    with hub_and_leaf(tmp_path, monkeypatch, admin=True) as (hub, leaf):
        async with _orchestrator(hub.url) as orchestrator:
            intruder = await nats.connect(leaf.url, **ADMIN)
            try:
                with pytest.raises((NoStreamResponseError, nats.errors.TimeoutError)):
                    await intruder.jetstream(domain="hub", timeout=2).publish(
                        "tasks.chat.any", b'{"id":"evil","prompt":"x"}'
                    )
            finally:
                await intruder.close()
            info = await orchestrator.js.stream_info(TASKS_STREAM)
            assert info.state.messages == 0


async def test_pi_worker_carries_on_after_the_hub_restarts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with hub_and_leaf(tmp_path, monkeypatch, fixed_ports=True) as (hub, leaf):
        async with _orchestrator(hub.url) as orchestrator:
            await declare_capability(
                orchestrator.js, Capability.for_model("echo"), TOPOLOGY, update=True
            )
            env = _worker_env(leaf.url)
            worker = WorkerProcess(
                leaf.url, "--backend", "echo", env=env, log_path=tmp_path / "worker.log"
            )
            try:
                await poll_until(lambda: WORKER_ID in orchestrator.workers, timeout_s=20)
                _, before = await orchestrator.run([Task(id="r-1", prompt="one")], 15)
                assert before["r-1"].status == "ok"

                hub.stop()
                hub.start()  # same ports, same JetStream store
                link = HealthOptions(
                    role="nats",
                    connection=ConnectionSettings(),
                    monitor_url=f"{leaf.monitor_url}/healthz",
                    leaf_link=True,
                    timeout_s=2,
                )

                async def linked() -> bool:
                    return all(check.ok for check in await run_checks(link))

                await poll_until(linked, timeout_s=20, what="the leaf to link again")
                _, after = await orchestrator.run([Task(id="r-2", prompt="two")], 20)
                assert after["r-2"].status == "ok", worker.log()
                assert after["r-2"].worker_id == WORKER_ID
                assert worker.process.poll() is None, "the worker never restarted"
            finally:
                assert worker.stop() == 0, worker.log()
    log = (tmp_path / "worker.log").read_text()
    assert log.count("pull request ended") < 50, "no busy loop while the hub was away"
