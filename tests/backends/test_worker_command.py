"""`d8 worker --backend ...` as a real process: clear start-up errors, and a clear stop."""

from __future__ import annotations

import subprocess
import sys
from typing import TYPE_CHECKING

import anyio
import pytest

from mesh.contract import Task
from mesh.topology import TASKS_STREAM
from tests.backends.conftest import KEY, MODEL
from tests.helpers import ROOT, WorkerProcess, orchestrator_for, poll_until

if TYPE_CHECKING:
    from pathlib import Path

    from tests.backends.conftest import Provider

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("backend", "args", "env", "message"),
    [
        ("ollama", [], {}, "d8 worker: the ollama backend needs a model: pass --model"),
        (
            "groq",
            ["--model", "m"],
            {},
            "d8 worker: the groq backend needs an API key: set GROQ_API_KEY",
        ),
        (
            "groq",
            [],
            {"GROQ_API_KEY": KEY},
            "d8 worker: the groq backend needs a model: pass --model",
        ),
        ("gemini", ["--model", "m"], {}, "set GEMINI_API_KEY or GOOGLE_API_KEY"),
        ("openai", ["--model", "m"], {}, "needs an API key: set OPENAI_API_KEY"),
        ("echo", ["--model", "..."], {}, "d8 worker: --model '...': model name '...' has no"),
    ],
)
def test_the_worker_command_says_what_is_missing(
    backend: str, args: list[str], env: dict[str, str], message: str
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mesh.cli", "worker", "--backend", backend, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), **env},
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("cloud_backend", ["groq"])
async def test_a_revoked_key_stops_the_worker_process_with_the_reason(
    cloud_provider: Provider, nats_url: str, tmp_path: Path
) -> None:
    env = {"GROQ_BASE_URL": cloud_provider.base_url, "D8_LOG_LEVEL": "debug"}
    async with orchestrator_for(nats_url) as orch:
        worker = WorkerProcess(
            nats_url, "--backend", "groq", "--model", MODEL, env=env, log_path=tmp_path / "w.log"
        )
        try:
            await poll_until(lambda: orch.workers, timeout_s=20, what="the worker to start")
            cloud_provider.revoke_key()
            await orch.submit(Task(id="revoked-1", prompt="still allowed?"))
            await poll_until(lambda: worker.process.poll() is not None, timeout_s=20, what="exit")
        finally:
            code = await anyio.to_thread.run_sync(worker.stop)
        stream = await orch.js.stream_info(TASKS_STREAM)

    log = worker.log()
    assert code == 3, log
    assert "d8 worker: stopped: Groq at" in log
    assert "refused this worker's credentials (401): Invalid API Key" in log
    assert KEY not in log
    assert stream.state.messages == 1
    assert len(cloud_provider.fake.calls_for("still allowed?")) == 1
