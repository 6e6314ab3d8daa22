"""Any language: a Node.js program with the plain `nats` package submits and gets its result."""

from __future__ import annotations

import json
import shutil
import subprocess

import anyio
import pytest

from tests.helpers import ROOT, orchestrator_for, running_worker, worker_settings

pytestmark = pytest.mark.anyio

NODE_DIR = ROOT / "tests" / "node"


async def test_a_node_client_submits_a_task_and_gets_the_result(nats_url: str) -> None:
    node = shutil.which("node")
    assert node is not None, "Node.js is needed for this test (Debian package nodejs)"
    assert (NODE_DIR / "node_modules" / "nats").is_dir(), (
        "run `make test` (it runs npm install in tests/node)"
    )

    async with orchestrator_for(nats_url), running_worker(worker_settings(nats_url)) as worker:
        done = await anyio.to_thread.run_sync(
            lambda: subprocess.run(
                [node, "submit.mjs", "from-node-1", "score this answer"],
                cwd=NODE_DIR,
                env={"NATS_URL": nats_url, "PATH": "/usr/bin:/bin"},
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
        )
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["ack"]["stream"] == "TASKS"
    assert answer["pushed"]["status"] == "ok"
    assert answer["pushed"]["output"] == "echo: score this answer"
    assert answer["pushed"]["worker_id"] == worker.worker_id
    assert answer["stored"] == answer["pushed"]
    assert answer["stored"]["metadata"] == {"client": "node"}
