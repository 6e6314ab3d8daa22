"""Starting nodes: the orchestrator with its HTTP API, and the all-in-one mesh of `d8 up`."""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import subprocess
import sys
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, TypeVar

import anyio
import httpx

from mesh.connection import ConnectionSettings
from mesh.errors import ConfigError, MeshError
from mesh.logs import hide_secrets, secret_values
from mesh.server import EmbeddedServer, parent_death_hook
from orchestrator.core import Orchestrator, OrchestratorSettings

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from mesh.server import EmbeddedServer as _Server

__all__ = [
    "MeshProcesses",
    "bind_http_sockets",
    "detect_ollama",
    "mesh_running",
    "run_unless_workers_exit",
    "serve_http",
]

logger = logging.getLogger(__name__)

DEFAULT_HTTP_PORT = 7001

_T = TypeVar("_T")


def bind_http_sockets(
    host: str, port: int, *, hint: str = "pass --http-port"
) -> list[socket.socket]:
    """Sockets bound to every address of `host` at `port`, for `serve_http`.

    Binding before anything starts lets a busy port be a one-line error rather than
    uvicorn's exit from inside a task group, after the mesh has announced itself.

    Raises:
        ConfigError: the port is in use, or `host` has no address to bind here.
    """
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"HTTP host {host!r} does not resolve: {exc.strerror}") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(addresses):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # As asyncio's create_server: the IPv4 addresses get sockets of their own.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"HTTP port {port} on {host} is in use: stop what holds it, or {hint}"
            ) from None
        raise ConfigError(f"cannot listen on {host}:{port} for HTTP: {exc.strerror}") from None
    return sockets


async def serve_http(
    orchestrator: Orchestrator,
    host: str,
    port: int,
    stop: anyio.Event,
    sockets: list[socket.socket] | None = None,
) -> None:
    """Serve the HTTP API until `stop` is set, on `sockets` if given (else it binds them)."""
    import uvicorn

    from orchestrator.http import create_app

    if sockets is None:
        sockets = bind_http_sockets(host, port)
    config = uvicorn.Config(
        create_app(orchestrator), host=host, port=port, log_level="warning", lifespan="off"
    )
    server = uvicorn.Server(config)
    try:
        async with anyio.create_task_group() as group:
            group.start_soon(server.serve, sockets)
            logger.info("http api listening url=http://%s:%d", host, port)
            await stop.wait()
            server.should_exit = True
    finally:
        for sock in sockets:
            sock.close()


def detect_ollama(host: str | None = None, model: str | None = None) -> str | None:
    """A model a local Ollama serves (the wanted one if present), or None if none answers."""
    from workers.backends.ollama import ollama_host

    try:
        response = httpx.get(f"{ollama_host(host)}/api/tags", timeout=1.0)
        response.raise_for_status()
        names = [m["name"] for m in response.json().get("models", [])]
    except (httpx.HTTPError, ValueError, KeyError):
        return None
    if model and (model in names or f"{model}:latest" in names):
        return model
    return names[0] if names else None


@dataclass
class MeshProcesses:
    """What `d8 up` started: maybe a server, and worker processes."""

    connection: ConnectionSettings
    server: _Server | None
    workers: list[subprocess.Popen[bytes]]
    backend: str
    model: str | None
    #: Set when every worker process has exited while the mesh runs; `failure` says why.
    workers_exited: anyio.Event = field(default_factory=anyio.Event)
    failure: str = ""
    exited_count: int = 0


async def run_unless_workers_exit(mesh: MeshProcesses, work: Callable[[], Awaitable[_T]]) -> _T:
    """What `work()` returns, unless every worker exits first.

    Raises:
        MeshError: every worker exited; the message says how the last one did.
    """
    returned: list[_T] = []

    async def run() -> None:
        returned.append(await work())
        group.cancel_scope.cancel()

    async with anyio.create_task_group() as group:
        group.start_soon(run)
        await mesh.workers_exited.wait()
        group.cancel_scope.cancel()
    if not returned:
        raise MeshError(mesh.failure)
    return returned[0]


def _spawn_worker(
    connection: ConnectionSettings, backend: str, model: str | None, index: int
) -> subprocess.Popen[bytes]:
    command = [
        sys.executable,
        "-m",
        "mesh.cli",
        "--log-level",
        os.environ.get("D8_WORKER_LOG_LEVEL", "warning"),
    ]
    command += ["worker", "--backend", backend]
    if model:
        command += ["--model", model]
    env = {**os.environ, "NATS_URL": ",".join(connection.servers), "D8_WORKER_INDEX": str(index)}
    # stderr comes through `_relay_until_exit`, which keeps its last line for the reason.
    return subprocess.Popen(
        command, env=env, stderr=subprocess.PIPE, preexec_fn=parent_death_hook()
    )


def _relay_until_exit(process: subprocess.Popen[bytes]) -> tuple[int, str]:
    """Copy a worker's stderr to ours until it closes; its exit status and last line."""
    secrets = secret_values()
    last_line = ""
    is_relaying = True
    if process.stderr is not None:
        for raw in process.stderr:
            line = hide_secrets(raw.decode(errors="replace"), secrets)
            last_line = line.strip() or last_line
            if is_relaying:
                try:
                    sys.stderr.write(line)
                    sys.stderr.flush()
                except (OSError, ValueError):
                    # Our stderr is gone (a closed pipe): keep draining, so the worker never
                    # blocks on a full one.
                    is_relaying = False
        process.stderr.close()
    return process.wait(), last_line


def _exit_status(status: int) -> str:
    return signal.Signals(-status).name if status < 0 else str(status)


async def _watch_worker(
    mesh: MeshProcesses,
    process: subprocess.Popen[bytes],
    index: int,
    limiter: anyio.CapacityLimiter,
) -> None:
    """Log a worker's exit while the mesh runs; the last one out sets `workers_exited`."""
    status, last_line = await anyio.to_thread.run_sync(
        _relay_until_exit, process, abandon_on_cancel=True, limiter=limiter
    )
    logger.warning(
        "worker exited index=%d pid=%d status=%s", index, process.pid, _exit_status(status)
    )
    mesh.exited_count += 1
    if mesh.exited_count == len(mesh.workers):
        how = f"killed by {_exit_status(status)}" if status < 0 else f"exit status {status}"
        mesh.failure = f"every worker has exited, the last (pid {process.pid}) with {how}"
        if last_line:
            mesh.failure += f": {last_line}"
        mesh.workers_exited.set()


@asynccontextmanager
async def mesh_running(
    *,
    workers: int,
    backend: str | None = None,
    model: str | None = None,
    store_dir: str | None = None,
) -> AsyncIterator[MeshProcesses]:
    """An embedded server (unless NATS_URL is set) and `workers` worker processes."""
    connection = ConnectionSettings.from_env(name="d8-up")
    server = None
    if not os.environ.get("NATS_URL"):
        server = EmbeddedServer(store_dir)
        # Spawned on this (the main) thread, so the server dies with this process.
        server.spawn()
        await anyio.to_thread.run_sync(server.wait_until_listening)
        connection = replace(connection, servers=(server.url,))
    if backend is None:
        found = detect_ollama(model=model or os.environ.get("D8_OLLAMA_MODEL"))
        if found:
            backend, model = "ollama", found
            logger.info("ollama found, using it model=%s", model)
        else:
            backend = "echo"
            logger.warning(
                "no Ollama answers at OLLAMA_HOST, so the workers use the built-in echo backend "
                "(start Ollama or pass --backend to change this)"
            )
    processes = MeshProcesses(connection, server, [], backend, model)
    # A thread each relays a worker's stderr: their own limiter, so many workers cannot
    # starve the default one the waits below share.
    limiter = anyio.CapacityLimiter(max(1, workers))
    try:
        async with anyio.create_task_group() as group:
            for index in range(workers):
                process = _spawn_worker(connection, backend, model, index)
                processes.workers.append(process)
                group.start_soon(_watch_worker, processes, process, index, limiter)
            try:
                yield processes
            finally:
                # Exits from here on are the stop asked for, not news.
                group.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            for process in processes.workers:
                if process.poll() is None:
                    process.terminate()
            for process in processes.workers:
                await anyio.to_thread.run_sync(_wait_or_kill, process)
            if server is not None:
                await anyio.to_thread.run_sync(server.stop)


def _wait_or_kill(process: subprocess.Popen[bytes]) -> None:
    try:
        process.wait(40)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


def orchestrator_settings(connection: ConnectionSettings) -> OrchestratorSettings:
    from mesh.settings import topology_from_env
    from orchestrator.routing import RoutingSettings

    return OrchestratorSettings(
        topology=topology_from_env(), connection=connection, routing=RoutingSettings.from_env()
    )
