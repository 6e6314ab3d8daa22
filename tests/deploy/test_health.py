"""`d8 health`: each role's probe against the real thing, healthy and not."""

from __future__ import annotations

import os
import socket
import sys
from typing import TYPE_CHECKING

import anyio
import pytest

from mesh.connection import ConnectionSettings
from mesh.errors import ConfigError
from mesh.health import (
    HealthOptions,
    check_heartbeat,
    resolve_role,
    role_from_command,
    run_checks,
    worker_id_from_command,
)
from orchestrator.launch import serve_http
from tests.helpers import ROOT, orchestrator_for, poll_until, running_worker, worker_settings

if TYPE_CHECKING:
    from pathlib import Path

    from mesh.server import EmbeddedServer

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


@pytest.mark.parametrize(
    ("argv", "role"),
    [
        (["d8", "worker", "--backend", "ollama"], "worker"),
        (
            ["/opt/d8/bin/python", "/opt/d8/bin/d8", "--log-level", "debug", "orchestrator"],
            "orchestrator",
        ),
        (["/sbin/docker-init", "--", "d8", "worker", "--backend", "groq"], "worker"),
        (["/sbin/docker-init", "--", "nats-entrypoint.sh", "hub"], "nats"),
        (["nats-server", "-c", "/etc/d8/nats/leaf.conf"], "nats"),
        (["python", "-m", "mesh.cli", "worker"], "worker"),
        (["d8", "submit", "hello"], None),
        (["bash"], None),
        ([], None),
    ],
)
def test_role_from_command(argv: list[str], role: str | None) -> None:
    assert role_from_command(argv) == role


def test_role_from_pid_1(tmp_path: Path) -> None:
    (tmp_path / "1").mkdir()
    (tmp_path / "1/cmdline").write_bytes(b"/sbin/docker-init\0--\0d8\0worker\0--worker-id\0w7\0")
    role, argv = resolve_role(None, {}, proc=tmp_path)
    assert role == "worker"
    assert worker_id_from_command(argv, 1, {}) == "w7"
    assert resolve_role(None, {"D8_ROLE": "nats"}, proc=tmp_path)[0] == "nats"
    assert resolve_role("orchestrator", {"D8_ROLE": "nats"}, proc=tmp_path)[0] == "orchestrator"
    with pytest.raises(ConfigError, match=r"pass --role worker\|orchestrator\|nats"):
        resolve_role(None, {}, proc=tmp_path / "missing")


def test_default_worker_id_follows_the_worker_rule() -> None:
    host = socket.gethostname()
    assert worker_id_from_command(["d8", "worker"], 1, {"D8_BACKEND": "groq"}).startswith(host[:3])
    assert worker_id_from_command(["d8", "worker", "--backend", "echo"], 7, {}).endswith("-echo-7")
    assert worker_id_from_command(["d8", "worker"], 1, {"D8_WORKER_ID": "pi-ollama"}) == "pi-ollama"


async def test_worker_heartbeat_present_stale_and_gone(nats_url: str) -> None:
    connection = ConnectionSettings(servers=(nats_url,))
    settings = worker_settings(nats_url, worker_id="w-health")
    async with running_worker(settings) as worker:
        options = HealthOptions(role="worker", connection=connection, worker_id="w-health")
        checks = await run_checks(options)
        assert [(c.name, c.ok) for c in checks] == [("nats", True), ("heartbeat", True)], checks
        stale = await check_heartbeat(connection, "w-health", max_age_s=-1, timeout_s=5)
        assert not stale.ok
        assert "old" in stale.detail
        unknown = await check_heartbeat(connection, "w-other", max_age_s=15, timeout_s=5)
        assert unknown.detail == "no heartbeat for worker_id=w-other"
        worker.stop()
    gone = await check_heartbeat(connection, "w-health", max_age_s=15, timeout_s=5)
    assert not gone.ok
    assert "removed" in gone.detail


async def test_unreachable_nats_is_unhealthy() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    connection = ConnectionSettings(servers=(f"nats://127.0.0.1:{port}",))
    checks = await run_checks(
        HealthOptions(role="worker", connection=connection, worker_id="w", timeout_s=2)
    )
    assert [c.ok for c in checks] == [False, False]


async def test_orchestrator_health_follows_its_http_api(nats_url: str) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    options = HealthOptions(
        role="orchestrator",
        connection=ConnectionSettings(servers=(nats_url,)),
        http_url=f"http://127.0.0.1:{port}/health",
        timeout_s=2,
    )
    down = await run_checks(options)
    assert [(c.name, c.ok) for c in down] == [("nats", True), ("orchestrator-http", False)]
    stop = anyio.Event()
    async with orchestrator_for(nats_url) as orchestrator, anyio.create_task_group() as group:
        group.start_soon(serve_http, orchestrator, "127.0.0.1", port, stop)

        async def healthy() -> bool:
            return all(c.ok for c in await run_checks(options))

        await poll_until(healthy, what="the orchestrator's HTTP API")
        stop.set()


async def test_cli_health_of_nats_server(nats_server: EmbeddedServer) -> None:
    command = [sys.executable, "-m", "mesh.cli", "health", "--role", "nats"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with anyio.fail_after(30):
        ok = await anyio.run_process(
            command,
            env={**env, "D8_NATS_MONITOR_URL": f"{nats_server.monitor_url}/healthz"},
            check=False,
        )
        bad = await anyio.run_process(
            command,
            env={**env, "D8_NATS_MONITOR_URL": f"{nats_server.monitor_url}/nothing"},
            check=False,
        )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert b"ok   nats nats-monitor" in ok.stdout
    assert bad.returncode == 1
    assert b"FAIL nats nats-monitor" in bad.stdout
