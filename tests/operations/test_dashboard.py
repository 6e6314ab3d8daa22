"""The dashboard in a real headless Chromium: live workers, queue figures and failures appear."""

from __future__ import annotations

import html
import re
import shutil
import socket
import struct
import zlib
from typing import TYPE_CHECKING

import anyio
import httpx
import nats
import pytest

from mesh.contract import Task
from mesh.topology import DEAD_STREAM
from orchestrator.launch import serve_http
from tests.helpers import orchestrator_for, poll_until, running_worker, worker_settings

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.anyio

CHROMIUM_TIMEOUT_S = 60.0
# Virtual time lets the page's first fetch of /status and its drawing finish before the dump.
VIRTUAL_TIME_MS = 3000


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail(
        "the dashboard test needs a real headless Chromium: apt-get install -y chromium "
        "(.ci/run installs it)"
    )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _flags(profile: Path) -> list[str]:
    return [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        f"--virtual-time-budget={VIRTUAL_TIME_MS}",
    ]


async def _run_chromium(args: list[str]) -> str:
    with anyio.fail_after(CHROMIUM_TIMEOUT_S):
        done = await anyio.run_process(args, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    return done.stdout.decode(errors="replace")


def _rows(dom: str, table_id: str) -> list[list[str]]:
    table = re.search(rf'<table id="{table_id}">(.*?)</table>', dom, re.S)
    assert table, f"no table {table_id} in the page"
    body = table.group(1).split("<tbody>", 1)[1]
    return [
        [
            html.unescape(re.sub(r"<[^>]+>", "", cell))
            for cell in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)
        ]
        for row in re.findall(r"<tr[^>]*>(.*?)</tr>", body, re.S)
    ]


def _png_rows(data: bytes) -> tuple[int, int, int]:
    """Width, height and how many distinct pixel rows a PNG has."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    position, idat, width, height = 8, b"", 0, 0
    while position < len(data):
        length, kind = struct.unpack(">I4s", data[position : position + 8])
        chunk = data[position + 8 : position + 8 + length]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", chunk[:8])
        elif kind == b"IDAT":
            idat += chunk
        position += 12 + length
    raw = zlib.decompress(idat)
    stride = len(raw) // height
    # Each row starts with a filter byte; identical rows compress to identical bytes only
    # with the same filter, so this undercounts variety: a lower bound is what we want.
    return width, height, len({raw[i * stride + 1 : (i + 1) * stride] for i in range(height)})


async def test_the_dashboard_shows_live_data_in_headless_chromium(
    nats_url: str, tmp_path: Path
) -> None:
    chromium = _chromium()
    port = _free_port()
    url = f"http://127.0.0.1:{port}/dashboard"
    stop = anyio.Event()
    async with (
        orchestrator_for(nats_url) as orch,
        running_worker(worker_settings(nats_url, worker_id="dash-pi")),
        anyio.create_task_group() as group,
    ):
        group.start_soon(serve_http, orch, "127.0.0.1", port, stop)
        await poll_until(lambda: _answers(url), what="http server")
        await poll_until(lambda: "dash-pi" in orch.workers, what="worker")
        await orch.submit_many(
            Task(id=f"wait-{i}", prompt="x", model="nobody-serves-this") for i in range(7)
        )
        nc = await nats.connect(nats_url)
        try:
            await nc.jetstream().publish(
                "tasks.chat.any", b"{oops", headers={"Nats-Msg-Id": "oops"}
            )
        finally:
            await nc.close()
        await poll_until(lambda: _dead_letters(orch.js), what="a dead letter")
        # A subject no queue reads (one token too many): flagged, not silently kept.
        await orch.js.publish("tasks.chat.any.extra", b'{"id": "lost", "prompt": "x"}')

        dom = await _run_chromium([chromium, *_flags(tmp_path / "profile-dom"), "--dump-dom", url])
        screenshot = tmp_path / "dashboard.png"
        await _run_chromium(
            [
                chromium,
                *_flags(tmp_path / "profile-shot"),
                f"--screenshot={screenshot}",
                "--window-size=1280,900",
                url,
            ]
        )
        stop.set()

    workers = _rows(dom, "workers")
    assert [row[0] for row in workers] == ["dash-pi"], workers
    queues = {row[0]: row for row in _rows(dom, "queues")}
    # capability, workers, pending, in flight, redelivered, dead, done, rate
    assert queues["chat/nobody-serves-this"][1:4] == ["0", "7", "0"], queues
    assert queues["chat/any"][1] == "1" and queues["chat/any"][5] == "1", queues
    failures = _rows(dom, "failures")
    assert failures[0][1] == "oops" and failures[0][3] == "invalid_task", failures
    assert "invalid task" in failures[0][6]
    assert "1 live worker(s)" in dom
    assert "1 task(s) on subjects no queue reads: tasks.chat.any.extra (1)" in dom

    width, height, distinct = _png_rows(screenshot.read_bytes())
    assert (width, height) == (1280, 900)
    assert distinct > 50, f"the screenshot looks blank ({distinct} distinct rows)"


async def _answers(url: str) -> bool:
    try:
        async with httpx.AsyncClient(timeout=2) as http:
            return (await http.get(url)).status_code == 200
    except httpx.HTTPError:
        return False


async def _dead_letters(js: object) -> bool:
    info = await js.stream_info(DEAD_STREAM)  # type: ignore[attr-defined]
    return bool(info.state.messages >= 1)
