"""The `d8` command end to end: `up`, then `submit`, `result` and `workers` against it."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.helpers import ROOT

if TYPE_CHECKING:
    from pathlib import Path


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _d8(*args: str, env: dict[str, str], timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mesh.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
        cwd=ROOT,
    )


def _wait_for_url(log: Path, process: subprocess.Popen[bytes], timeout_s: float = 30) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = re.search(r"d8 mesh up: NATS (nats://\S+),", log.read_text(errors="replace"))
        if found:
            return found.group(1)
        assert process.poll() is None, log.read_text()
        time.sleep(0.05)  # polling a log file with a deadline, not synchronising on time
    raise AssertionError(f"d8 up did not start: {log.read_text()}")


def test_d8_up_serves_submit_result_and_workers(tmp_path: Path) -> None:
    port = _free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "D8_STORE_DIR": str(tmp_path / "store"),
        "OLLAMA_HOST": f"127.0.0.1:{_free_port()}",
        "NATS_URL": "",
    }
    env.pop("NATS_URL")
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        up = subprocess.Popen(
            [sys.executable, "-m", "mesh.cli", "up", "--workers", "2", "--http-port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    try:
        url = _wait_for_url(log, up)
        client_env = {**env, "NATS_URL": url}

        submitted = _d8(
            "submit", "hello mesh", "--id", "cli-1", "--wait", "--timeout-s", "30", env=client_env
        )
        assert submitted.returncode == 0, submitted.stderr
        assert "1/1 tasks ok" in submitted.stdout

        # The same id again: its stored result, said to be one, with --wait and --stream.
        again = _d8("submit", "other", "--id", "cli-1", "--wait", env=client_env)
        assert again.returncode == 0 and "echo: hello mesh" in again.stdout
        assert "1 id(s) submitted before (cli-1): their stored results" in again.stderr
        streamed = _d8("submit", "other", "--id", "cli-1", "--stream", env=client_env)
        assert streamed.returncode == 0, streamed.stderr
        assert streamed.stdout.strip() == "echo: hello mesh"
        assert "cli-1 was submitted before" in streamed.stderr

        unserved = _d8("submit", "hi", "--model", "nobody:1b", "--wait", env=client_env)
        assert unserved.returncode == 1
        assert "nobody:1b" in unserved.stderr and "live" in unserved.stderr

        result = _d8("result", "cli-1", env=client_env)
        assert result.returncode == 0 and '"output": "echo: hello mesh"' in result.stdout

        missing = _d8("result", "never-submitted", env=client_env)
        assert missing.returncode == 1 and "no result for never-submitted yet" in missing.stderr

        workers = _d8("workers", env=client_env)
        assert workers.returncode == 0 and workers.stdout.count("echo") >= 2
        assert "nats connected" not in workers.stderr, "a client logs at warning by default"

        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
        assert health.json()["workers"] == 2
        assert "no Ollama answers at OLLAMA_HOST" in log.read_text()
    finally:
        up.send_signal(signal.SIGTERM)
        code = up.wait(60)
    assert code == 0, log.read_text()[-2000:]


def test_the_demo_runs_the_example_workload_to_its_last_line() -> None:
    # What `make demo` runs, on a machine with no Ollama and no NATS_URL.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OLLAMA_HOST": f"127.0.0.1:{_free_port()}"}
    env.pop("NATS_URL", None)
    done = _d8("demo", "examples/d8-workload.jsonl", env=env, timeout_s=90)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert lines[-1] == "56/56 tasks ok", done.stdout[-2000:]
    assert "nats stream info TASKS" in done.stdout


def test_a_bad_log_level_is_refused_with_the_choices() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "D8_LOG_LEVEL": "loud"}
    done = _d8("workers", env=env, timeout_s=30)
    assert done.returncode == 2
    assert "D8_LOG_LEVEL='loud': choose one of debug, info, warning, error" in done.stderr


def test_log_lines_never_show_a_secret(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import logging

    from mesh.logs import configure_logging

    monkeypatch.setenv("GROQ_API_KEY", "gsk_secret_0123456789")
    monkeypatch.setenv("NATS_PASSWORD", "nats-pass-9876")
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        for json_lines in (False, True):
            configure_logging("info", json_lines=json_lines)
            try:
                raise RuntimeError("provider said: bad key gsk_secret_0123456789")
            except RuntimeError:
                logging.getLogger("test").exception(
                    "call failed password=%s url=%s",
                    "nats-pass-9876",
                    "http://bob:pw12345@127.0.0.1:1/v1",
                )
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    err = capsys.readouterr().err
    assert err.count("call failed") == 2
    assert "gsk_secret" not in err and "nats-pass" not in err and "pw12345" not in err
    assert "url=http://***@127.0.0.1:1/v1" in err
    assert err.count("***") >= 4


def test_submit_refuses_a_bad_jsonl_file_before_sending_anything(tmp_path: Path) -> None:
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text('{"id": "ok-1", "prompt": "fine"}\n{"id": "bad 2", "prompt": "x"}\n')
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NATS_URL": "nats://127.0.0.1:1"}
    done = _d8("submit", "--file", str(tasks), env=env)
    assert done.returncode == 2
    assert f"{tasks}:2: not a valid task: Expected `str` matching regex" in done.stderr


@pytest.mark.parametrize("workload", ["examples/d8-workload.jsonl"])
def test_the_example_workload_is_valid_and_realistic(workload: str) -> None:
    from orchestrator.client import load_tasks

    tasks = load_tasks(str(ROOT / workload))
    kinds = {t.metadata["kind"] for t in tasks}
    assert len(tasks) >= 50
    assert kinds == {"mutate", "crossover", "score"}


def test_results_table_shows_brackets_as_written() -> None:
    from rich.console import Console

    from mesh.contract import Result, Task
    from orchestrator.client import results_table

    console = Console(width=200, markup=False, record=True)
    result = Result(id="b", status="ok", output="[/INST] close tag [/] and [bold]x[/bold]")
    console.print(results_table([Task(id="b", prompt="x")], {"b": result}))
    assert "[/INST] close tag [/] and [bold]x[/bold]" in console.export_text()
