"""Starting nodes: the orchestrator with its HTTP API, and the all-in-one mesh of `d8 up`."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import anyio
import httpx

from mesh.connection import ConnectionSettings
from mesh.server import EmbeddedServer
from orchestrator.core import Orchestrator, OrchestratorSettings

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from mesh.server import EmbeddedServer as _Server

__all__ = ["MeshProcesses", "detect_ollama", "mesh_running", "serve_http"]

logger = logging.getLogger(__name__)

DEFAULT_HTTP_PORT = 7001


async def serve_http(orchestrator: Orchestrator, host: str, port: int, stop: anyio.Event) -> None:
    """Serve the HTTP API until `stop` is set."""
    import uvicorn

    from orchestrator.http import create_app

    config = uvicorn.Config(
        create_app(orchestrator), host=host, port=port, log_level="warning", lifespan="off"
    )
    server = uvicorn.Server(config)
    async with anyio.create_task_group() as group:
        group.start_soon(server.serve)
        logger.info("http api listening url=http://%s:%d", host, port)
        await stop.wait()
        server.should_exit = True


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
    return subprocess.Popen(command, env=env)


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
        await anyio.to_thread.run_sync(server.start)
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
    try:
        processes.workers = [_spawn_worker(connection, backend, model, i) for i in range(workers)]
        yield processes
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
