"""Every shipped NATS config passes `nats-server -t`, and the entrypoint guards passwords."""

from __future__ import annotations

import os
import subprocess
import sysconfig
from pathlib import Path

import pytest

from mesh.server import find_server_binary
from tests.deploy.nats_configs import NATS_DIR, PASSWORDS
from tests.helpers import ROOT

pytestmark = pytest.mark.timeout(60)

ENTRYPOINT = ROOT / "docker" / "nats-entrypoint.sh"
ROUTES = {f"D8_ROUTE_{n}": f"nats-route://route:r@127.0.0.1:{6221 + n}" for n in (1, 2, 3)}
# What each config reads from the environment, as compose and the systemd units set it.
ENV = {
    "hub": {**PASSWORDS, "D8_NATS_STORE_DIR": "/data/jetstream"},
    "leaf": {
        "D8_WORKER_PASSWORD": PASSWORDS["D8_WORKER_PASSWORD"],
        "D8_NODE_NAME": "pi-1",
        "D8_HUB_LEAF_URL": "nats-leaf://leaf:secret@hub.lan:7422",
    },
    "cluster": {
        **PASSWORDS,
        **ROUTES,
        "D8_NODE_NAME": "nats-1",
        "D8_NATS_STORE_DIR": "/data/jetstream",
        "D8_ROUTE_PASSWORD": "route-test-password-0001",
    },
}


def _check(config: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [find_server_binary(), "-t", "-c", str(config)],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize("name", sorted(ENV))
def test_config_is_valid(name: str) -> None:
    result = _check(NATS_DIR / f"{name}.conf", ENV[name])
    assert result.returncode == 0, result.stderr
    assert "is valid" in result.stderr + result.stdout


def test_every_config_is_covered() -> None:
    shipped = {p.stem for p in NATS_DIR.glob("*.conf")} - {"permissions", "leaf-permissions"}
    assert shipped == set(ENV)


@pytest.mark.parametrize("name", sorted(ENV))
def test_config_without_a_password_does_not_load(name: str) -> None:
    env = {k: v for k, v in ENV[name].items() if k != "D8_WORKER_PASSWORD"}
    result = _check(NATS_DIR / f"{name}.conf", env)
    assert result.returncode != 0
    assert "D8_WORKER_PASSWORD" in result.stderr


def _entrypoint(role: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    path = f"{Path(sysconfig.get_path('scripts'))}:{os.environ['PATH']}"
    return subprocess.run(
        ["sh", str(ENTRYPOINT), role, "-t"],
        env={"PATH": path, "D8_NATS_CONFIG_DIR": str(NATS_DIR), **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize("name", sorted(ENV))
def test_entrypoint_starts_a_complete_config(name: str) -> None:
    result = _entrypoint(name, ENV[name])
    assert result.returncode == 0, result.stderr
    assert "is valid" in result.stderr


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (None, "D8_CLIENT_PASSWORD is not set"),
        ("", "D8_CLIENT_PASSWORD is not set"),
        ("short", "D8_CLIENT_PASSWORD is shorter than 16 characters"),
    ],
)
def test_entrypoint_refuses_a_missing_or_weak_password(value: str | None, message: str) -> None:
    # nats-server itself would take an empty variable as an empty password.
    env = {k: v for k, v in ENV["hub"].items() if k != "D8_CLIENT_PASSWORD"}
    if value is not None:
        env["D8_CLIENT_PASSWORD"] = value
    result = _entrypoint("hub", env)
    assert result.returncode == 2
    assert message in result.stderr
    assert "is valid" not in result.stderr


def test_entrypoint_names_the_roles() -> None:
    result = _entrypoint("bogus", {})
    assert result.returncode == 2
    assert "hub, leaf or cluster" in result.stderr
