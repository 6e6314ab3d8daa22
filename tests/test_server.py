"""The embedded server: one store dir, one server."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from mesh.errors import ConfigError
from mesh.server import EmbeddedServer

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.anyio


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


async def test_wrong_credentials_are_named_and_never_shown(tmp_path: Path) -> None:
    from mesh.connection import ConnectionSettings, connect

    config = tmp_path / "auth.conf"
    store = tmp_path / "store"
    config.write_text(
        f'listen: 127.0.0.1:-1\njetstream {{ store_dir: "{store}" }}\n'
        'authorization { user: a, password: "correct-horse-battery" }\n'
    )
    with EmbeddedServer(store, config_file=config) as server:
        settings = ConnectionSettings(
            servers=(server.url,), user="a", password="wrong-secret-xyz", connect_attempts=1
        )
        with pytest.raises(ConfigError, match="refused our credentials") as refused:
            await connect(settings)
    assert "wrong-secret-xyz" not in str(refused.value)


def test_an_error_that_keeps_coming_is_logged_once_a_minute_with_a_count() -> None:
    from mesh.connection import RepeatedErrors

    repeats = RepeatedErrors(every_s=60)
    refused = "Connect call failed ('127.0.0.1', 4222)"
    # Reconnect attempts twice a second while the server is away.
    shown = [repeats.muted(refused, 0.5 * i) for i in range(130)]
    assert [(i, n) for i, n in enumerate(shown) if n is not None] == [(0, 0), (120, 119)]
    # Another error is shown at once, and so is the first one when it comes back.
    assert repeats.muted("Stale Connection", 65.0) == 0
    assert repeats.muted(refused, 65.5) == 0
