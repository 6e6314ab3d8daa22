"""The orchestrator's HTTP API, served by a real server on a loopback port."""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

import anyio
import httpx
import pytest

from orchestrator.launch import serve_http
from tests.helpers import (
    health_answers,
    orchestrator_for,
    poll_until,
    running_worker,
    worker_settings,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

pytestmark = pytest.mark.anyio


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_http_api_submits_waits_and_reports(nats_url: str) -> None:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    stop = anyio.Event()
    async with (
        orchestrator_for(nats_url) as orch,
        running_worker(worker_settings(nats_url)) as worker,
    ):
        async with (
            anyio.create_task_group() as group,
            httpx.AsyncClient(base_url=base, timeout=10) as http,
        ):
            group.start_soon(serve_http, orch, "127.0.0.1", port, stop)
            await poll_until(lambda: health_answers(http), what="http server")

            one = await http.post("/tasks?wait=10", json={"id": "h-1", "prompt": "hello"})
            assert one.status_code == 200
            assert one.json()["results"][0]["output"] == "echo: hello"

            batch = await http.post(
                "/tasks", json=[{"id": "h-2", "prompt": "a"}, {"id": "h-3", "prompt": "b"}]
            )
            assert batch.status_code == 202
            assert [s["id"] for s in batch.json()["submitted"]] == ["h-2", "h-3"]
            waited = await http.get("/results/h-3?wait=10")
            assert waited.status_code == 200 and waited.json()["status"] == "ok"

            again = await http.post("/tasks?wait=10", json={"id": "h-1", "prompt": "hello"})
            assert again.json()["submitted"][0]["duplicate"] is True
            assert again.json()["results"][0]["id"] == "h-1"

            bad = await http.post("/tasks", content=b'{"id": "h 4", "prompt": "x"}')
            assert bad.status_code == 400
            assert "Expected `str` matching regex" in bad.json()["error"]["message"]

            huge = await http.post("/tasks", json={"id": "h-5", "prompt": "x" * 2_000_000})
            assert huge.status_code == 413
            assert "over the server's max_payload" in huge.json()["error"]["message"]

            async def endless() -> AsyncIterator[bytes]:
                # A chunked upload with no length: refused once past the cap, not read to end.
                for _ in range(10_000):
                    yield b"x" * 65_536

            chunked = await http.post("/tasks", content=endless())
            assert chunked.status_code == 413 and "request body over" in chunked.text

            bad_wait = await http.get("/results/h-1?wait=soon")
            assert bad_wait.status_code == 400
            assert "wait='soon' is not a number" in bad_wait.json()["error"]["message"]

            wildcard = await http.get("/results/*")
            assert wildcard.status_code == 400
            assert "is not a task id" in wildcard.json()["error"]["message"]

            nested = b'{"id": "deep", "prompt": "x", "metadata": {"m": ' + b"[" * 50_000
            deep = await http.post("/tasks", content=nested + b"]" * 50_000 + b"}}")
            assert deep.status_code == 400

            missing = await http.get("/results/nope")
            assert missing.status_code == 404
            assert missing.json()["error"]["message"] == "no result is stored for task nope (yet)"

            await poll_until(lambda: worker.worker_id in orch.workers, what="heartbeat")
            workers = (await http.get("/workers")).json()["workers"]
            assert [w["worker_id"] for w in workers] == [worker.worker_id]
            health = await http.get("/health")
            assert health.status_code == 200 and health.json()["nats"] is True
            stop.set()
