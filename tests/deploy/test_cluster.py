"""deploy/nats/cluster.conf as a real three-node cluster on loopback, replicas 3."""

from __future__ import annotations

import socket
import urllib.error
from typing import TYPE_CHECKING

import pytest

from mesh.connection import ConnectionSettings
from mesh.contract import Task
from mesh.server import EmbeddedServer
from mesh.topology import TASKS_STREAM, Capability, TopologySettings, declare_capability
from orchestrator.core import Orchestrator, OrchestratorSettings
from tests.deploy.nats_configs import PASSWORDS, monitor_json, render, wait_for
from tests.helpers import running_worker, worker_settings

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

ROUTE_PASSWORD = "route-test-password-0001"


def _free_ports(count: int) -> list[int]:
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def _peers(node: EmbeddedServer) -> set[str]:
    # Route pooling opens several connections per peer: count the peers by name.
    routes = monitor_json(node, "/routez").get("routes") or []
    assert isinstance(routes, list)
    return {route.get("remote_name", "") for route in routes}


def _healthy(node: EmbeddedServer) -> bool:
    try:
        return monitor_json(node, "/healthz").get("status") == "ok"
    except urllib.error.HTTPError:
        return False  # 503 while JetStream is not current yet


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[EmbeddedServer]]:
    """Three nodes, each from cluster.conf with its own name, store and route port."""
    ports = _free_ports(3)
    for name, value in PASSWORDS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("D8_ROUTE_PASSWORD", ROUTE_PASSWORD)
    for index, port in enumerate(ports, 1):
        url = f"nats-route://route:{ROUTE_PASSWORD}@127.0.0.1:{port}"
        monkeypatch.setenv(f"D8_ROUTE_{index}", url)
    nodes: list[EmbeddedServer] = []
    try:
        for index, port in enumerate(ports, 1):
            directory = tmp_path / f"nats-{index}"
            config = render(
                "cluster.conf",
                directory,
                {
                    "listen: 0.0.0.0:4222": "listen: 127.0.0.1:-1",
                    "http: 127.0.0.1:8222": "http: 127.0.0.1:-1",
                    "listen: 0.0.0.0:6222": f"listen: 127.0.0.1:{port}",
                    "listen: 0.0.0.0:7422": "listen: 127.0.0.1:-1",
                },
            )
            monkeypatch.setenv("D8_NODE_NAME", f"nats-{index}")
            monkeypatch.setenv("D8_NATS_STORE_DIR", str(directory / "jetstream"))
            node = EmbeddedServer(directory, config_file=config, log_file=directory / "nats.log")
            node.start()
            nodes.append(node)
        for node in nodes:
            wait_for(lambda node=node: len(_peers(node)) == 2, "routes between the three nodes")
        yield nodes
    finally:
        for node in nodes:
            node.stop()


async def test_three_node_cluster_runs_the_mesh_with_three_replicas(
    cluster: list[EmbeddedServer],
) -> None:
    urls = tuple(node.url for node in cluster)
    topology = TopologySettings(heartbeat_interval_s=1.0, replicas=3)
    orchestrator_connection = ConnectionSettings(
        servers=urls,
        user="orchestrator",
        password=PASSWORDS["D8_ORCHESTRATOR_PASSWORD"],
        inbox_prefix="_INBOX_orchestrator",
    )
    worker_connection = ConnectionSettings(
        servers=(urls[2],),
        user="worker",
        password=PASSWORDS["D8_WORKER_PASSWORD"],
        inbox_prefix="_INBOX_worker",
    )
    # JetStream answers once every node reports its meta state current.
    wait_for(lambda: all(_healthy(node) for node in cluster), "JetStream healthy on all nodes")
    settings = OrchestratorSettings(connection=orchestrator_connection, topology=topology)
    async with Orchestrator(settings) as orchestrator:
        await declare_capability(
            orchestrator.js, Capability.for_model("echo"), topology, update=True
        )
        info = await orchestrator.js.stream_info(TASKS_STREAM)
        assert info.config.num_replicas == 3
        worker = worker_settings(urls[2], connection=worker_connection, topology=topology)
        async with running_worker(worker):
            _, results = await orchestrator.run([Task(id="c-1", prompt="three")], timeout_s=15)
    assert results["c-1"].output == "echo: three"
