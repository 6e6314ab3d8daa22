"""`d8` when something is wrong: a busy port, workers that exit, a killed parent, bad flags."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT
from tests.test_cli import _d8, _free_port, _wait_for_url


def _env(**changes: str) -> dict[str, str]:
    """The environment of a `d8` run: no NATS_URL, no Ollama, no cloud key."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OLLAMA_HOST": f"127.0.0.1:{_free_port()}"}
    for name in ("NATS_URL", "D8_STORE_DIR", "GROQ_API_KEY"):
        env.pop(name, None)
    return {**env, **changes}


def _children(pid: int) -> set[int]:
    """The pids whose parent is `pid`, from /proc."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name in brackets may hold spaces: the fields after it are state, ppid.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.add(int(entry.name))
    return found


def _is_running(pid: int) -> bool:
    """Alive and not a zombie (a container's init may never reap an orphan)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.parametrize("command", ["up", "orchestrator"])
def test_a_busy_http_port_is_one_line_and_exit_2_before_anything_starts(
    command: str, tmp_path: Path
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = _env(D8_STORE_DIR=str(tmp_path / "store"), NATS_URL="nats://127.0.0.1:1")
        if command == "up":
            env.pop("NATS_URL")
        done = _d8(command, "--http-port", str(port), env=env, timeout_s=30)

    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"d8 {command}: HTTP port {port} on 127.0.0.1 is in use: stop what holds it, "
        f"or pass --http-port" + (" (or set D8_HTTP_PORT)" if command == "orchestrator" else "")
    ]
    assert "d8 mesh up" not in done.stdout
    assert not (tmp_path / "store").exists(), "a nats-server started before the port check"


def test_d8_up_stops_with_the_reason_when_every_worker_has_exited(tmp_path: Path) -> None:
    # A secret whose value the workers' error quotes: it must come out as ***.
    env = _env(D8_STORE_DIR=str(tmp_path / "store"), OLLAMA_API_KEY="GROQ_API_KEY")
    port = str(_free_port())
    done = _d8("up", "--backend", "groq", "--model", "x", "--http-port", port, env=env)

    assert done.returncode == 1, done.stderr[-2000:]
    assert "worker exited index=0" in done.stderr and "worker exited index=1" in done.stderr
    assert "status=2" in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("d8 up: every worker has exited, the last (pid "), last
    assert last.endswith(
        "with exit status 2: d8 worker: the groq backend needs an API key: set ***"
    )
    assert "GROQ_API_KEY" not in done.stderr + done.stdout
    assert "Traceback" not in done.stderr


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_children_of_a_sigkilled_d8_up_go_with_it_and_the_store_is_free_again(
    tmp_path: Path,
) -> None:
    store = tmp_path / "own-store"
    env = _env()
    command = [sys.executable, "-m", "mesh.cli", "up", "--store-dir", str(store)]
    command += ["--workers", "2", "--http-port", str(_free_port())]
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        up = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    children: set[int] = set()
    try:
        _wait_for_url(log, up)
        children = _children(up.pid)
        assert len(children) == 3, f"not a nats-server and 2 workers: {children}"
        assert (store / "nats-server.log").is_file(), "--store-dir was not used"

        up.kill()
        up.wait(10)
        deadline = time.monotonic() + 15
        while any(_is_running(pid) for pid in children):
            assert time.monotonic() < deadline, f"orphans: {children}: {log.read_text()}"
            time.sleep(0.05)  # polling for exits with a deadline, not synchronising on time
    finally:
        for pid in children:
            if _is_running(pid):
                os.kill(pid, signal.SIGKILL)

    again_log = tmp_path / "again.log"
    with open(again_log, "wb") as out:
        again = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        _wait_for_url(again_log, again)
    finally:
        again.send_signal(signal.SIGTERM)
        code = again.wait(30)
    assert code == 0, again_log.read_text()[-2000:]


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        ([], "the ollama backend needs a model: pass --model"),
        (["--model", "nobody:1b"], "Ollama does not answer at http://127.0.0.1:"),
    ],
)
def test_a_demo_whose_workers_all_exit_ends_with_one_line(model: list[str], reason: str) -> None:
    done = _d8("demo", "--backend", "ollama", *model, "--workers", "2", env=_env())

    assert done.returncode == 1, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("d8 demo: every worker has exited"), last
    assert reason in last
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["watch", "--interval-s", "-1"], "argument --interval-s: must be more than 0 seconds"),
        (["status", "--sample-s", "-3"], "argument --sample-s: must be 0 or more seconds"),
        (["submit", "hi", "--timeout-s", "-1"], "argument --timeout-s: must be more than 0"),
        (["up", "--workers", "-1"], "argument --workers: must be 0 or more, not -1"),
        (["up", "--http-port", "0"], "argument --http-port: must be 1..65535, not 0"),
        (["up", "--http-port", "65536"], "argument --http-port: must be 1..65535, not 65536"),
        (["orchestrator", "--http-port", "-1"], "argument --http-port: must be 0..65535"),
        (["demo", "--workers", "0"], "argument --workers: must be 1 or more, not 0"),
    ],
)
def test_a_bad_flag_is_one_error_line_and_exit_2(args: list[str], error: str) -> None:
    done = _d8(*args, env=_env(NATS_URL="nats://127.0.0.1:1"), timeout_s=30)

    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith(f"d8 {args[0]}: error: {error}")
    assert "Traceback" not in done.stderr
