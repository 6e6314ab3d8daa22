"""Rendering the configs of deploy/nats for a test: loopback, random ports, temp stores.

Only listen addresses change (the store directory is D8_NATS_STORE_DIR, as in the image);
permissions, users, mappings and JetStream settings are the shipped ones. Each replacement
must find its text, so a config edit that the rendering no longer matches fails loudly
instead of testing something else.
"""

from __future__ import annotations

import json
import shutil
import socket
import time
import urllib.request
from contextlib import contextmanager
from typing import TYPE_CHECKING

from mesh.server import EmbeddedServer
from tests.helpers import ROOT

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping
    from pathlib import Path

    import pytest

__all__ = [
    "NATS_DIR",
    "PASSWORDS",
    "free_ports",
    "hub_and_leaf",
    "monitor_json",
    "render",
    "render_hub",
    "render_leaf",
    "wait_for",
]

NATS_DIR = ROOT / "deploy" / "nats"
# Test-only passwords, long enough for docker/nats-entrypoint.sh.
PASSWORDS = {
    "D8_ORCHESTRATOR_PASSWORD": "orchestrator-test-password",
    "D8_WORKER_PASSWORD": "worker-test-password-0001",
    "D8_CLIENT_PASSWORD": "client-test-password-0001",
    "D8_LEAF_PASSWORD": "leaf-test-password-000001",
}
ADMIN = {"user": "admin", "password": "admin-test-password"}
_ADMIN_USER = '{user: admin, password: "admin-test-password"}'


def render(name: str, directory: Path, replacements: Mapping[str, str]) -> Path:
    """Copy deploy/nats/`name` (and the files it includes) into `directory`, edited."""
    directory.mkdir(parents=True, exist_ok=True)
    for include in ("permissions.conf", "leaf-permissions.conf"):
        shutil.copy(NATS_DIR / include, directory / include)
    text = (NATS_DIR / name).read_text()
    for old, new in replacements.items():
        assert old in text, (
            f"{name} no longer contains {old!r}: update tests/deploy/nats_configs.py"
        )
        text = text.replace(old, new)
    target = directory / name
    target.write_text(text)
    return target


def _with_admin(text_replacements: dict[str, str], admin: bool) -> dict[str, str]:
    if admin:
        # A test-only superuser, to set up what no role may (a foreign bucket).
        text_replacements["users = ["] = f"users = [\n    {_ADMIN_USER}"
    return text_replacements


def render_hub(
    directory: Path, *, admin: bool = False, ports: tuple[int, int] | None = None
) -> Path:
    """hub.conf on 127.0.0.1 with random client, leaf and monitoring ports.

    With `ports` (client, leaf) those two are fixed, so a restart keeps them.

    JetStream's store is D8_NATS_STORE_DIR, which the caller sets.
    """
    client, leaf = ports or (-1, -1)
    return render(
        "hub.conf",
        directory,
        _with_admin(
            {
                "listen: 0.0.0.0:4222": f"listen: 127.0.0.1:{client}",
                "http: 127.0.0.1:8222": "http: 127.0.0.1:-1",
                "listen: 0.0.0.0:7422": f"listen: 127.0.0.1:{leaf}",
            },
            admin,
        ),
    )


def render_leaf(directory: Path, *, admin: bool = False) -> Path:
    """leaf.conf on 127.0.0.1 with random client and monitoring ports."""
    return render(
        "leaf.conf",
        directory,
        _with_admin(
            {
                "listen: 0.0.0.0:4222": "listen: 127.0.0.1:-1",
                "http: 127.0.0.1:8222": "http: 127.0.0.1:-1",
            },
            admin,
        ),
    )


def monitor_json(server: EmbeddedServer, path: str) -> dict[str, object]:
    """GET a monitoring endpoint of a running server (loopback only)."""
    with urllib.request.urlopen(server.monitor_url + path, timeout=5) as response:
        data: dict[str, object] = json.load(response)
    return data


def wait_for(check: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    """Poll `check` (a look at a real server) until it holds; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.02)


def free_ports(count: int) -> list[int]:
    """Ports nothing listens on now (for configs that must keep theirs across a restart)."""
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


@contextmanager
def hub_and_leaf(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    *,
    admin: bool = False,
    fixed_ports: bool = False,
) -> Iterator[tuple[EmbeddedServer, EmbeddedServer]]:
    """A running hub and a leaf linked to it, from the shipped configs."""
    for name, value in PASSWORDS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("D8_NODE_NAME", "pi-test")
    monkeypatch.setenv("D8_NATS_STORE_DIR", str(tmp_path / "hub" / "jetstream"))
    client_port, leaf_port = free_ports(2)
    ports = (client_port, leaf_port) if fixed_ports else None
    hub_conf = render_hub(tmp_path / "hub", admin=admin, ports=ports)
    with EmbeddedServer(
        tmp_path / "hub", config_file=hub_conf, log_file=tmp_path / "hub.log"
    ) as hub:
        leaf_info = monitor_json(hub, "/varz")["leaf"]
        assert isinstance(leaf_info, dict)
        password = PASSWORDS["D8_LEAF_PASSWORD"]
        url = f"nats-leaf://leaf:{password}@127.0.0.1:{leaf_info['port']}"
        monkeypatch.setenv("D8_HUB_LEAF_URL", url)
        leaf_conf = render_leaf(tmp_path / "leaf", admin=admin)
        with EmbeddedServer(
            tmp_path / "leaf", config_file=leaf_conf, log_file=tmp_path / "leaf.log"
        ) as leaf:
            wait_for(lambda: bool(monitor_json(hub, "/leafz").get("leafnodes")), "the leaf link")
            yield hub, leaf
