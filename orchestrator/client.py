"""The client side of the CLI: `d8 submit`, `d8 result`, `d8 workers`, and their output."""

from __future__ import annotations

import sys
import time
import uuid
from dataclasses import replace
from typing import TYPE_CHECKING

import msgspec
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mesh.connection import ConnectionSettings
from mesh.contract import Heartbeat, Result, Task, decode_heartbeat, decode_task
from mesh.errors import ConfigError
from mesh.topology import WORKERS_BUCKET, chunk_subject
from orchestrator.core import Orchestrator, OrchestratorSettings
from orchestrator.routing import RoutingSettings

if TYPE_CHECKING:
    import argparse
    from collections.abc import Iterable

    from nats.aio.msg import Msg

__all__ = [
    "load_tasks",
    "result_command",
    "results_table",
    "run_with_progress",
    "submit_command",
    "workers_command",
    "workers_table",
]

# Wide enough for the tables when output goes to a file or a pipe (rich assumes 80 there).
# markup=False: model output and error reasons are shown as written, never read as markup.
console = Console(width=None if sys.stdout.isatty() else 120, markup=False)
err_console = Console(stderr=True, markup=False)


def client_settings(*, route: bool = False) -> OrchestratorSettings:
    """A plain client: it declares nothing; with `route`, it refuses (or reroutes) a task
    for a model no live worker serves, as the orchestrator's HTTP API does."""
    routing = replace(RoutingSettings.from_env(), move_queued=False) if route else None
    return OrchestratorSettings(
        connection=ConnectionSettings.from_env(name="d8-client"),
        declare=False,
        watch_workers=route,
        routing=routing,
    )


def load_tasks(path: str) -> list[Task]:
    """Tasks from a JSONL file; a bad line is reported with its number, nothing is sent."""
    tasks = []
    try:
        with open(path, "rb") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    tasks.append(decode_task(line))
                except (msgspec.DecodeError, RecursionError) as exc:
                    raise ConfigError(f"{path}:{number}: not a valid task: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    ids = [t.id for t in tasks]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{path}: task ids repeat; each task needs its own id")
    return tasks


def _task_from_args(args: argparse.Namespace) -> Task:
    if not args.prompt:
        raise ConfigError("give a prompt, or --file with a JSONL file of tasks")
    task_id = args.id or uuid.uuid4().hex[:16]
    try:
        return Task(
            id=task_id, prompt=args.prompt, model=args.model, system=args.system, stream=args.stream
        )
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"bad task: {exc}") from None


async def submit_command(args: argparse.Namespace) -> int:
    tasks = load_tasks(args.file) if args.file else [_task_from_args(args)]
    async with Orchestrator(client_settings(route=True)) as orchestrator:
        if args.stream and len(tasks) == 1:
            return await _submit_streaming(orchestrator, tasks[0], args.timeout_s)
        if not args.wait:
            submitted = await orchestrator.submit_many(tasks)
            for item in submitted:
                note = " (duplicate: already submitted)" if item.duplicate else ""
                console.print(f"{item.task_id} -> {item.subject}{note}")
            return 0
        repeats: list[str] = []
        results = await run_with_progress(orchestrator, tasks, args.timeout_s, repeats)
    console.print(results_table(tasks, results))
    if repeats:
        shown = ", ".join(repeats[:5]) + (", ..." if len(repeats) > 5 else "")
        err_console.print(
            f"{len(repeats)} id(s) submitted before ({shown}): their stored results are shown, "
            "not new runs; give a new id to run a task again"
        )
    ok = sum(1 for r in results.values() if r.status == "ok")
    console.print(f"{ok}/{len(tasks)} tasks ok")
    return 0 if ok == len(tasks) else 1


async def _submit_streaming(orchestrator: Orchestrator, task: Task, timeout_s: float) -> int:
    task = replace_task(task, stream=True)

    async def on_piece(msg: Msg) -> None:
        sys.stdout.write(msg.data.decode(errors="replace"))
        sys.stdout.flush()

    subscription = await orchestrator.nc.subscribe(chunk_subject(task.id), cb=on_piece)
    submitted, results = await orchestrator.run([task], timeout_s)
    await subscription.unsubscribe()
    result = results.get(task.id)
    if submitted[0].duplicate:
        # Nothing streams for an id that ran before: its stored result is the answer.
        err_console.print(f"{task.id} was submitted before: its stored result follows")
        if result is not None:
            sys.stdout.write(result.output)
    sys.stdout.write("\n")
    if result is None:
        err_console.print(
            f"no result within {timeout_s:g}s; `d8 result {task.id}` looks again later"
        )
        return 1
    if result.status != "ok":
        err_console.print(f"{result.status}: {result.error.message if result.error else ''}")
    return 0 if result.status == "ok" else 1


async def run_with_progress(
    orchestrator: Orchestrator,
    tasks: list[Task],
    timeout_s: float,
    repeats: list[str] | None = None,
) -> dict[str, Result]:
    """Submit and wait, with a progress bar that moves as results arrive; the ids that were
    submitted before (duplicates) are added to `repeats` when it is given."""
    columns = (TextColumn("tasks"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task("tasks", total=len(tasks))
        submitted, results = await orchestrator.run(
            tasks, timeout_s, lambda _: progress.advance(bar)
        )
    if repeats is not None:
        repeats.extend(s.task_id for s in submitted if s.duplicate)
    return results


def replace_task(task: Task, **changes: object) -> Task:
    return msgspec.structs.replace(task, **changes)


async def result_command(args: argparse.Namespace) -> int:
    async with Orchestrator(client_settings()) as orchestrator:
        if args.wait_s:
            result = await orchestrator.wait(args.task_id, args.wait_s)
        else:
            result = await orchestrator.result(args.task_id)
    if result is None:
        err_console.print(f"no result for {args.task_id} yet")
        return 1
    sys.stdout.write(msgspec.json.format(msgspec.json.encode(result), indent=2).decode() + "\n")
    return 0


async def workers_command(args: argparse.Namespace) -> int:
    async with Orchestrator(client_settings()) as orchestrator:
        kv = await orchestrator.js.key_value(WORKERS_BUCKET)
        heartbeats = []
        for key in await _keys(kv):
            entry = await kv.get(key)
            if entry.value:
                heartbeats.append(decode_heartbeat(entry.value))
    console.print(workers_table(heartbeats))
    return 0


async def _keys(kv: object) -> list[str]:
    from nats.js.errors import NoKeysError

    try:
        return list(await kv.keys())  # type: ignore[attr-defined]
    except NoKeysError:
        return []


def workers_table(heartbeats: Iterable[Heartbeat]) -> Table:
    table = Table(title="live workers")
    for column in (
        "worker",
        "backend",
        "models",
        "in flight",
        "done",
        "failed",
        "RSS MB",
        "last beat",
    ):
        table.add_column(column)
    now = time.time()
    for hb in sorted(heartbeats, key=lambda h: h.worker_id):
        table.add_row(
            hb.worker_id,
            hb.backend,
            ",".join(hb.models),
            f"{hb.in_flight}/{hb.concurrency}",
            str(hb.completed),
            str(hb.failed),
            f"{hb.rss_mb:.0f}",
            f"{max(0.0, now - hb.sent_at):.1f}s ago",
        )
    return table


def results_table(tasks: Iterable[Task], results: dict[str, Result], width: int = 48) -> Table:
    table = Table(title="results")
    table.add_column("task", no_wrap=True)
    table.add_column("status", no_wrap=True, min_width=7)
    table.add_column("worker", no_wrap=True, overflow="ellipsis", max_width=24)
    table.add_column("try", no_wrap=True, justify="right")
    table.add_column("ms", no_wrap=True, justify="right", min_width=6)
    table.add_column("output / error", no_wrap=True, overflow="ellipsis")
    for task in tasks:
        result = results.get(task.id)
        if result is None:
            table.add_row(task.id, "missing", "", "", "", "no result in time")
            continue
        text = (
            result.output
            if result.status == "ok"
            else (result.error.message if result.error else "")
        )
        text = " ".join(text.split())
        table.add_row(
            task.id,
            result.status,
            result.worker_id or "",
            str(result.attempt),
            f"{result.timings.total_ms:.1f}",
            text[:width],
        )
    return table
