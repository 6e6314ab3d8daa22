"""The embedded server: one store dir, one server."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from mesh.errors import ConfigError
from mesh.server import EmbeddedServer

if TYPE_CHECKING:
    from pathlib import Path


def test_a_second_server_on_the_same_store_is_refused(tmp_path: Path) -> None:
    with EmbeddedServer(tmp_path / "store"):
        with pytest.raises(ConfigError, match="is in use by another running nats-server"):
            EmbeddedServer(tmp_path / "store").start()
    with EmbeddedServer(tmp_path / "store") as again:
        assert again.url.startswith("nats://127.0.0.1:")


def test_starting_leaves_no_ports_folder_behind(tmp_path: Path) -> None:
    server = EmbeddedServer(tmp_path / "store")
    with server:
        ports_dir = server._ports_dir
    assert ports_dir
    assert not (tmp_path / ports_dir).exists()
