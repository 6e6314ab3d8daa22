"""Fixtures: a real nats-server with JetStream per test, on a random loopback port."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

import pytest

from mesh.server import EmbeddedServer

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Every coroutine test runs on anyio's asyncio backend. Modules with parametrized
    # coroutine tests also set `pytestmark = pytest.mark.anyio`: parametrizing happens
    # before this hook runs.
    for item in items:
        if isinstance(item, pytest.Function) and inspect.iscoroutinefunction(item.obj):
            item.add_marker(pytest.mark.anyio)


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, bool]]:
    return ("asyncio", {"debug": False})


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    """A fresh JetStream server; its log is kept in the test's temp dir."""
    with EmbeddedServer(tmp_path / "store", log_file=tmp_path / "nats.log") as server:
        yield server


@pytest.fixture
def nats_url(nats_server: EmbeddedServer) -> str:
    return nats_server.url
