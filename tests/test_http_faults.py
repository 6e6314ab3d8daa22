"""The HTTP API when NATS goes away or the `results` bucket holds something else."""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import anyio
import httpx
import pytest
from anyio import wait_all_tasks_blocked

from mesh.errors import CorruptResultError, NatsUnreachableError
from mesh.topology import TASKS_STREAM, result_subject
from orchestrator.launch import serve_http
from orchestrator.link import NatsLink
from tests.helpers import ROOT, health_answers, orchestrator_for, poll_until

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from mesh.server import EmbeddedServer
    from orchestrator.core import Orchestrator

pytestmark = pytest.mark.anyio

# Well over the link's 2 s grace, well under the 10 s and 30 s the API used to take.
PROMPT_S = 5.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@asynccontextmanager
async def _served(orch: Orchestrator) -> AsyncIterator[httpx.AsyncClient]:
    port = _free_port()
    stop = anyio.Event()
    async with (
        anyio.create_task_group() as group,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http,
    ):
        group.start_soon(serve_http, orch, "127.0.0.1", port, stop)
        await poll_until(lambda: health_answers(http), what="http server")
        try:
            yield http
        finally:
            stop.set()


async def _timed(
    http: httpx.AsyncClient, method: str, url: str, task: dict[str, str] | None = None
) -> httpx.Response:
    started = time.monotonic()
    response = await http.request(method, url, json=task)
    elapsed_s = time.monotonic() - started
    assert elapsed_s < PROMPT_S, f"{method} {url} took {elapsed_s:.1f}s"
    return response


async def test_the_api_answers_503_at_once_while_nats_is_down_and_refused_tasks_never_run(
    nats_server: EmbeddedServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with orchestrator_for(nats_server.url) as orch, _served(orch) as http:
        await anyio.to_thread.run_sync(nats_server.kill)
        await poll_until(lambda: not orch.link.is_connected, what="the orchestrator to notice")

        with caplog.at_level(logging.WARNING):
            reads = [
                await _timed(http, "GET", path) for path in ("/results/t1", "/status", "/metrics")
            ]
            waited = await _timed(http, "GET", "/results/t1?wait=5")
            submits = [
                await _timed(http, "POST", "/tasks?wait=5", {"id": "refused-1", "prompt": "a"}),
                await _timed(http, "POST", "/tasks", {"id": "refused-2", "prompt": "b"}),
            ]
        for response in [*reads, waited, *submits]:
            assert response.status_code == 503, response.text
            error = response.json()["error"]
            assert error["type"] == "nats_unreachable"
            assert error["message"].startswith("NATS is unreachable (no connection for ")
        assert "cannot read the result of t1" in reads[0].json()["error"]["message"]
        assert "cannot read the mesh's status" in reads[1].json()["error"]["message"]
        assert (
            submits[0]
            .json()["error"]["message"]
            .endswith("task refused-1 was not submitted; submit again once NATS is back")
        )
        refusals = [r for r in caplog.records if r.name == "orchestrator.http"]
        assert len(refusals) == 6
        assert all(r.levelno == logging.WARNING for r in refusals)
        assert [r for r in caplog.records if r.exc_info] == [], "no traceback in the log"

        await anyio.to_thread.run_sync(nats_server.start)
        await poll_until(lambda: orch.link.is_connected, what="the reconnect")
        after = await http.post("/tasks", json={"id": "after", "prompt": "c"})
        assert after.status_code == 202, after.text
        # Anything nats-py had buffered while away would have been sent before this task.
        info = await orch.js.stream_info(TASKS_STREAM)
        assert info.state.messages == 1, "a refused task was stored after all"
        health = await http.get("/health")
        assert health.status_code == 200


async def test_a_call_under_way_when_nats_goes_gives_up_after_the_grace_and_may_still_run() -> None:
    link = NatsLink(grace_s=0.2)
    never = anyio.Event()

    async def publish_without_ack() -> None:
        await never.wait()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as group:
            group.start_soon(link.run)
            failed: list[NatsUnreachableError] = []

            async def submit() -> None:
                with pytest.raises(NatsUnreachableError) as caught:
                    await link.call(publish_without_ack, "submit", ("t1",))
                failed.append(caught.value)

            group.start_soon(submit)
            await wait_all_tasks_blocked()
            link.disconnected()
            await poll_until(lambda: failed, what="the call to give up")
            group.cancel_scope.cancel()
    assert failed[0].sent is True
    assert str(failed[0]).startswith("NATS did not confirm task t1 (no connection for 0.")
    assert str(failed[0]).endswith(
        "it may still run: resubmit with the same id, which is deduplicated"
    )


async def test_a_call_while_nats_is_away_waits_out_the_grace_for_a_reconnect() -> None:
    link = NatsLink(grace_s=30)
    done: list[str] = []

    async def read() -> str:
        return "read"

    with anyio.fail_after(5):
        async with anyio.create_task_group() as group:
            link.disconnected()

            async def call() -> None:
                done.append(await link.call(read, "read"))

            group.start_soon(call)
            await wait_all_tasks_blocked()
            assert done == [], "nothing is sent while NATS is away"
            link.reconnected()
    assert done == ["read"]


@pytest.mark.parametrize(
    ("sent", "task_ids", "message"),
    [
        (
            False,
            ("a", "b", "c", "d"),
            "NATS is unreachable (no connection for 2.5s): tasks a, b, c and 1 more were not "
            "submitted; submit again once NATS is back",
        ),
        (
            True,
            ("a", "b"),
            "NATS did not confirm tasks a, b (no connection for 2.5s); they may still run: "
            "resubmit with the same ids, which are deduplicated",
        ),
        (
            True,
            (),
            "NATS is unreachable (no connection for 2.5s): cannot read the result of a; try "
            "again once it is back",
        ),
    ],
)
def test_unreachable_messages_say_whether_the_tasks_may_still_run(
    sent: bool, task_ids: tuple[str, ...], message: str
) -> None:
    error = NatsUnreachableError("read the result of a", sent=sent, away_s=2.5, task_ids=task_ids)
    assert str(error) == message


async def test_a_corrupt_stored_result_is_a_clear_error_over_http_and_in_the_cli(
    nats_url: str,
) -> None:
    async with orchestrator_for(nats_url) as orch, _served(orch) as http:
        # What `nats kv put results fakeres notjson` publishes.
        await orch.js.publish(result_subject("fakeres"), b"notjson")
        expected = "the value stored for task fakeres in the results bucket is not a d8 result"

        with pytest.raises(CorruptResultError, match=expected):
            await orch.result("fakeres")
        for path in ("/results/fakeres", "/results/fakeres?wait=1"):
            response = await http.get(path)
            assert response.status_code == 502, response.text
            error = response.json()["error"]
            assert error["type"] == "corrupt_result"
            assert error["message"].startswith(expected)

        env = {**os.environ, "NATS_URL": nats_url, "PYTHONPATH": str(ROOT)}
        cli = await anyio.run_process(
            [sys.executable, "-m", "mesh.cli", "result", "fakeres"], env=env, check=False
        )
    stderr = cli.stderr.decode()
    assert cli.returncode == 1, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith(f"d8 result: {expected}")
    assert len([line for line in stderr.splitlines() if "fakeres" in line]) == 1


async def test_a_result_never_stored_is_404_without_claiming_it_is_pending(nats_url: str) -> None:
    async with orchestrator_for(nats_url) as orch, _served(orch) as http:
        response = await http.get("/results/never")
        waited = await http.get("/results/never?wait=0.1")
    assert response.status_code == 404
    assert response.json() == {
        "id": "never",
        "error": {"type": "no_result", "message": "no result is stored for task never (yet)"},
    }
    assert waited.status_code == 404
    assert waited.json()["error"]["message"] == (
        "no result is stored for task never (yet); none came within 0.1s"
    )
