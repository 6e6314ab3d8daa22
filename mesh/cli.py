"""The `d8` command: run nodes, submit tasks, read results.

Every command reads its settings from `D8_*`/`NATS_*` variables and flags, checks them
before starting, and exits with status 2 and a fix-it message when one is wrong.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import anyio

from mesh.errors import ConfigError, MeshError
from mesh.logs import LEVELS

if TYPE_CHECKING:
    from orchestrator.core import Orchestrator
    from orchestrator.launch import MeshProcesses

__all__ = ["main"]

logger = logging.getLogger("d8")

Command = Callable[[argparse.Namespace], Awaitable[int]]


async def _until_signal(stop: Callable[[], None]) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            logger.info("signal received signal=%s", signal.Signals(signum).name)
            stop()


async def _cmd_server(args: argparse.Namespace) -> int:
    from mesh.server import EmbeddedServer

    server = EmbeddedServer(args.store_dir, host=args.host, port=args.port)
    # Spawned on the main thread, so the server goes with this process, even on SIGKILL.
    server.spawn()
    await anyio.to_thread.run_sync(server.wait_until_listening)
    print(f"nats-server listening on {server.url} (store {server.store_dir}); Ctrl-C stops it")
    stop = anyio.Event()
    died = False

    async def watch_server() -> None:
        nonlocal died
        await anyio.to_thread.run_sync(server.wait, abandon_on_cancel=True)
        died = True
        stop.set()

    async with anyio.create_task_group() as group:
        group.start_soon(_until_signal, stop.set)
        group.start_soon(watch_server)
        await stop.wait()
        group.cancel_scope.cancel()
    await anyio.to_thread.run_sync(server.stop)
    if died:
        print(f"d8 server: nats-server exited on its own; see {server.log_file}", file=sys.stderr)
        return 1
    return 0


async def _cmd_worker(args: argparse.Namespace) -> int:
    from workers.config import worker_settings_from
    from workers.runtime import Worker

    worker = Worker(worker_settings_from(args))
    _serve_worker_metrics(worker)
    async with anyio.create_task_group() as group:
        group.start_soon(_until_signal, worker.stop)
        await worker.run()
        group.cancel_scope.cancel()
    if worker.fatal is not None:
        print(f"d8 worker: stopped: {worker.fatal}", file=sys.stderr)
        return 3
    return 0


async def _cmd_orchestrator(args: argparse.Namespace) -> int:
    from mesh.connection import ConnectionSettings
    from mesh.settings import env_int
    from mesh.topology import Capability, declare_capability
    from orchestrator.core import Orchestrator
    from orchestrator.launch import bind_http_sockets, orchestrator_settings, serve_http

    settings = orchestrator_settings(ConnectionSettings.from_env(name="d8-orchestrator"))
    if args.http_port is None:
        args.http_port = env_int(os.environ, "D8_HTTP_PORT", 7001, maximum=65535)
    hint = "pass --http-port (or set D8_HTTP_PORT)"
    # Bound before connecting: a busy port is a one-line error, not a traceback later.
    sockets = bind_http_sockets(args.http_host, args.http_port, hint=hint) if args.http_port else []
    stop = anyio.Event()
    async with Orchestrator(settings) as orchestrator, anyio.create_task_group() as group:
        group.start_soon(_until_signal, stop.set)
        # Workers under deploy/nats permissions may not create their consumers: declare the
        # ones for the models in D8_MODELS up front.
        for model in filter(None, map(str.strip, os.environ.get("D8_MODELS", "").split(","))):
            capability = Capability.for_model(model, settings.kind)
            await declare_capability(orchestrator.js, capability, settings.topology, update=True)
        if sockets:
            host, port = args.http_host, args.http_port
            group.start_soon(serve_http, orchestrator, host, port, stop, sockets)
        logger.info("orchestrator ready")
        await stop.wait()
        group.cancel_scope.cancel()
    return 0


async def _cmd_up(args: argparse.Namespace) -> int:
    from orchestrator.core import Orchestrator
    from orchestrator.launch import (
        bind_http_sockets,
        mesh_running,
        orchestrator_settings,
        serve_http,
    )

    # Before anything starts: a busy port is a one-line error, not a half-started mesh.
    sockets = bind_http_sockets(args.http_host, args.http_port)
    stop = anyio.Event()
    workers_exited = False

    async def stop_when_workers_exit(event: anyio.Event) -> None:
        nonlocal workers_exited
        await event.wait()
        # After a Ctrl-C (which reaches the workers too) their exits are the stop asked for.
        workers_exited = not stop.is_set()
        stop.set()

    running = mesh_running(
        workers=args.workers, backend=args.backend, model=args.model, store_dir=args.store_dir
    )
    async with running as mesh, Orchestrator(orchestrator_settings(mesh.connection)) as orch:
        async with anyio.create_task_group() as group:
            group.start_soon(_until_signal, stop.set)
            group.start_soon(stop_when_workers_exit, mesh.workers_exited)
            host, port = args.http_host, args.http_port
            group.start_soon(serve_http, orch, host, port, stop, sockets)
            group.start_soon(_announce_when_live, orch, mesh, args)
            await stop.wait()
            group.cancel_scope.cancel()
    if workers_exited:
        print(f"d8 up: {mesh.failure}", file=sys.stderr)
        return 1
    return 0


#: How long `d8 up` waits for its workers' first heartbeats before it announces anyway.
WORKERS_LIVE_S = 30.0


async def _announce_when_live(
    orch: Orchestrator, mesh: MeshProcesses, args: argparse.Namespace
) -> None:
    # Announced once the workers' heartbeats are in: a submit right after the banner would
    # otherwise be refused with "no live worker serves any model".
    if not await orch.view.wait_for(args.workers, WORKERS_LIVE_S):
        logger.warning(
            "workers not live yet live=%d started=%d waited_s=%.0f",
            len(orch.workers),
            args.workers,
            WORKERS_LIVE_S,
        )
    _announce_up(mesh, args)


def _announce_up(mesh: MeshProcesses, args: argparse.Namespace) -> None:
    from mesh.connection import redact_url

    url = mesh.connection.servers[0]
    shown = redact_url(url)
    # A URL with credentials in it is the user's own NATS_URL: never echo them.
    export = f"export NATS_URL={url}" if shown == url else "use the same NATS_URL"
    print(
        f"d8 mesh up: NATS {shown}, {args.workers} {mesh.backend} "
        f"worker(s), HTTP http://{args.http_host}:{args.http_port}. Ctrl-C stops it.\n"
        f"In another shell: {export}, then "
        "d8 submit, d8 status, d8 workers, or nats --server $NATS_URL ...",
        flush=True,
    )


async def _cmd_demo(args: argparse.Namespace) -> int:
    from orchestrator.demo import run_demo

    return await run_demo(
        args.file,
        workers=args.workers,
        backend=args.backend,
        model=args.model,
        timeout_s=args.timeout_s,
    )


async def _cmd_submit(args: argparse.Namespace) -> int:
    from orchestrator.client import submit_command

    return await submit_command(args)


async def _cmd_result(args: argparse.Namespace) -> int:
    from orchestrator.client import result_command

    return await result_command(args)


async def _cmd_workers(args: argparse.Namespace) -> int:
    from orchestrator.views import workers_command

    return await workers_command(args)


async def _cmd_status(args: argparse.Namespace) -> int:
    from orchestrator.views import status_command

    return await status_command(args)


async def _cmd_watch(args: argparse.Namespace) -> int:
    from orchestrator.views import watch_command

    return await watch_command(args)


def _serve_worker_metrics(worker: object) -> None:
    """A worker's own `/metrics` when D8_METRICS_PORT is set (host: D8_METRICS_HOST)."""
    from mesh.settings import env_int

    port = env_int(os.environ, "D8_METRICS_PORT", 0, minimum=0, maximum=65535)
    if port:
        from orchestrator.metrics import serve_worker_metrics

        host = os.environ.get("D8_METRICS_HOST", "127.0.0.1")
        serve_worker_metrics(worker, host, port)  # type: ignore[arg-type]


def _configure_tracing(command: str) -> None:
    """Tracing per the OTEL_* variables (off without them); log records get the trace id."""
    from mesh import tracing

    if tracing.configure_from_env(service_name=f"d8-{command}"):
        for handler in logging.getLogger().handlers:
            handler.addFilter(tracing.TraceLogFilter())


async def _cmd_schema(args: argparse.Namespace) -> int:
    from mesh.contract import main as print_schemas

    print_schemas()
    return 0


def _integer(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number, refused outside `minimum`..`maximum`."""

    def checked(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            bounds = f"{minimum} or more" if maximum is None else f"{minimum}..{maximum}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, not {text}")
        return value

    return checked


def _seconds(*, zero: bool) -> Callable[[str], float]:
    """An argparse type for a duration: above 0, or 0 and above when `zero` means something."""

    def checked(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
        if math.isnan(value) or value < 0 or (value == 0 and not zero):
            wanted = "0 or more" if zero else "more than 0"
            raise argparse.ArgumentTypeError(f"must be {wanted} seconds, not {text}")
        return value

    return checked


def _add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ
    parser.add_argument(
        "--backend", default=env.get("D8_BACKEND", "echo"), help="echo, ollama, ..."
    )
    parser.add_argument(
        "--model", action="append", default=None, help="a model to serve (repeatable); D8_MODELS"
    )
    parser.add_argument(
        "--concurrency", type=int, default=None, help="tasks at once; D8_CONCURRENCY"
    )
    parser.add_argument(
        "--worker-id", default=env.get("D8_WORKER_ID"), help="default host-backend-pid"
    )
    parser.add_argument(
        "--no-any", action="store_true", help="do not take tasks from tasks.<kind>.any"
    )
    parser.add_argument(
        "--base-url", default=None, help="the backend's endpoint (else its usual variable)"
    )
    parser.add_argument(
        "--timeout-s", type=float, default=None, help="backend call timeout; D8_BACKEND_TIMEOUT_S"
    )
    parser.add_argument(
        "--pull", action="store_true", help="ollama: pull a missing model at start-up"
    )
    parser.add_argument(
        "--rpm", type=float, default=None, help="cloud: at most N calls a minute; D8_RPM"
    )
    parser.add_argument(
        "--grace-s", type=float, default=None, help="SIGTERM grace period; D8_GRACE_S"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="d8", description="d8-mesh: LLM tasks over a NATS JetStream mesh"
    )
    parser.add_argument(
        "--log-level",
        type=str.lower,
        choices=LEVELS,
        default=(os.environ.get("D8_LOG_LEVEL") or "").lower() or None,
        help="default: info for the services, warning for the client commands; D8_LOG_LEVEL",
    )
    parser.add_argument(
        "--log-json", action="store_true", default=os.environ.get("D8_LOG_JSON") == "1"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    server = commands.add_parser("server", help="run nats-server with JetStream")
    server.add_argument("--store-dir", default=None)
    server.add_argument("--host", default="127.0.0.1")
    server.add_argument("--port", type=int, default=4222)
    server.set_defaults(run=_cmd_server)

    worker = commands.add_parser("worker", help="run a worker")
    _add_worker_arguments(worker)
    worker.set_defaults(run=_cmd_worker)

    orchestrator = commands.add_parser("orchestrator", help="run the orchestrator and its HTTP API")
    orchestrator.add_argument("--http-host", default=os.environ.get("D8_HTTP_HOST", "127.0.0.1"))
    orchestrator.add_argument(
        "--http-port",
        type=_integer(0, 65535),
        default=None,
        help="default 7001 or D8_HTTP_PORT; 0: no HTTP",
    )
    orchestrator.set_defaults(run=_cmd_orchestrator)

    up = commands.add_parser(
        "up", help="all in one: server (unless NATS_URL), orchestrator, workers"
    )
    up.add_argument(
        "--workers", type=_integer(0), default=2, help="0: workers run elsewhere, on NATS_URL"
    )
    up.add_argument("--backend", default=None, help="default: ollama if it answers, else echo")
    up.add_argument("--model", default=None)
    up.add_argument("--http-host", default="127.0.0.1")
    up.add_argument("--http-port", type=_integer(1, 65535), default=7001)
    up.add_argument(
        "--store-dir", default=None, help="the embedded server's JetStream data; D8_STORE_DIR"
    )
    up.set_defaults(run=_cmd_up)

    demo = commands.add_parser("demo", help="run the example D8 workload through a fresh mesh")
    demo.add_argument("file", nargs="?", default=None, help="a JSONL file of tasks")
    demo.add_argument("--workers", type=_integer(1), default=3)
    demo.add_argument("--backend", default=None, help="default: ollama if it answers, else echo")
    demo.add_argument("--model", default=None, help="the model the workers serve")
    demo.add_argument("--timeout-s", type=_seconds(zero=False), default=120.0)
    demo.set_defaults(run=_cmd_demo)

    submit = commands.add_parser("submit", help="submit a prompt or a JSONL file of tasks")
    submit.add_argument("prompt", nargs="?", default=None)
    submit.add_argument("--file", default=None, help="JSONL, one task per line")
    submit.add_argument("--model", default=None)
    submit.add_argument("--id", default=None, help="task id (default: random)")
    submit.add_argument("--system", default=None)
    submit.add_argument("--wait", action="store_true", help="wait for results and print them")
    submit.add_argument("--stream", action="store_true", help="print output pieces as they arrive")
    submit.add_argument(
        "--timeout-s",
        type=_seconds(zero=False),
        default=300.0,
        help="how long --wait waits for results",
    )
    submit.set_defaults(run=_cmd_submit)

    result = commands.add_parser("result", help="print a task's result")
    result.add_argument("task_id")
    result.add_argument("--wait-s", type=_seconds(zero=True), default=0.0)
    result.set_defaults(run=_cmd_result)

    workers = commands.add_parser("workers", help="list live workers")
    workers.set_defaults(run=_cmd_workers)

    status = commands.add_parser("status", help="workers, queues and failures, from JetStream")
    status.add_argument(
        "--sample-s", type=_seconds(zero=True), default=1.0, help="look twice, for rates"
    )
    status.set_defaults(run=_cmd_status)

    watch = commands.add_parser("watch", help="`d8 status`, redrawn until Ctrl-C")
    watch.add_argument("--interval-s", type=_seconds(zero=False), default=2.0)
    watch.add_argument(
        "--count", type=_integer(0), default=0, help="stop after N redraws (0: never)"
    )
    watch.set_defaults(run=_cmd_watch)

    schema = commands.add_parser("schema", help="print the JSON Schemas of the wire contract")
    schema.set_defaults(run=_cmd_schema)

    from mesh.deploy_cli import add_deploy_commands

    add_deploy_commands(commands)
    return parser


async def _unwrapped(run: Command, args: argparse.Namespace) -> int:
    """Run a command; a lone error raised inside a task group comes out unwrapped."""
    try:
        return await run(args)
    except BaseExceptionGroup as group:
        inner: BaseException = group
        while isinstance(inner, BaseExceptionGroup) and len(inner.exceptions) == 1:
            inner = inner.exceptions[0]
        if isinstance(inner, MeshError):
            raise inner from None
        raise


_CLIENT_COMMANDS = frozenset({"submit", "result", "workers", "status", "watch", "schema", "health"})


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `d8` console command."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.log_level is None:
        # A client's output is its answer; "nats connected" and "worker joined" are noise.
        args.log_level = "warning" if args.command in _CLIENT_COMMANDS else "info"
    elif args.log_level not in LEVELS:
        parser.error(f"D8_LOG_LEVEL={args.log_level!r}: choose one of {', '.join(LEVELS)}")
    from mesh.logs import configure_logging

    configure_logging(args.log_level, json_lines=args.log_json)
    run: Command = args.run
    try:
        _configure_tracing(args.command)
        code = anyio.run(_unwrapped, run, args)
    except ConfigError as exc:
        print(f"d8 {args.command}: {exc}", file=sys.stderr)
        code = 2
    except MeshError as exc:
        print(f"d8 {args.command}: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    from mesh.tracing import shutdown as flush_traces

    flush_traces()
    sys.exit(code)


if __name__ == "__main__":
    main()
