"""`d8 status`, `d8 watch` and `d8 workers`: the status snapshot as terminal tables."""

from __future__ import annotations

import sys
import time
from contextlib import nullcontext
from typing import TYPE_CHECKING

import anyio
from nats.js.errors import NotFoundError
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from mesh.connection import ConnectionSettings, connect, jetstream
from mesh.errors import ConfigError
from orchestrator.status import StatusCollector, read_heartbeats, worker_view

if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence

    from nats.aio.client import Client as NATS
    from nats.js import JetStreamContext
    from rich.console import RenderableType

    from orchestrator.status import DeadLetterView, QueueFigures, StatusSnapshot, WorkerView

__all__ = [
    "failures_table",
    "queues_table",
    "status_command",
    "status_view",
    "watch_command",
    "worker_views_table",
    "workers_command",
]

# Wide enough for the tables when output goes to a file or a pipe (rich assumes 80 there).
# markup=False: worker ids and dead-letter reasons are shown as written, never as markup.
console = Console(width=None if sys.stdout.isatty() else 140, markup=False)


def _number(value: float | None, spec: str = "g") -> str:
    return "–" if value is None else format(value, spec)


def worker_views_table(workers: Sequence[WorkerView]) -> Table:
    """Live workers, with host facts and the age of their last heartbeat."""
    table = Table(title=f"live workers ({len(workers)})", title_justify="left")
    for column in ("worker", "host", "backend", "models", "in flight", "done", "failed"):
        table.add_column(
            column, justify="right" if column in ("in flight", "done", "failed") else "left"
        )
    for column in ("load", "SoC °C", "throttled", "RSS MB", "last beat"):
        table.add_column(column, justify="left" if column == "throttled" else "right")
    for worker in workers:
        table.add_row(
            worker.worker_id,
            worker.host,
            worker.backend,
            ",".join(worker.models),
            f"{worker.in_flight}/{worker.concurrency}",
            str(worker.completed),
            str(worker.failed),
            _number(worker.load_1m, ".2f"),
            _number(worker.soc_temp_c, ".1f"),
            ", ".join(worker.throttled) or "no",
            f"{worker.rss_mb:.0f}",
            f"{worker.age_s:.1f}s ago",
            style="yellow" if worker.throttled else None,
        )
    return table


def queues_table(queues: Sequence[QueueFigures]) -> Table:
    """Per capability: the consumer's figures, dead letters, and how fast it drains."""
    table = Table(title="queues (consumer info)", title_justify="left")
    table.add_column("capability")
    for column in ("workers", "pending", "in flight", "redelivered", "dead", "done", "rate/s"):
        table.add_column(column, justify="right")
    for queue in queues:
        done = "–" if queue.done is None else f"{queue.done} in {queue.window_s:.0f}s"
        stranded = queue.workers == 0 and queue.pending > 0
        table.add_row(
            queue.capability,
            str(queue.workers),
            str(queue.pending),
            str(queue.in_flight),
            str(queue.redelivered),
            str(queue.dead),
            done,
            _number(queue.rate, ".2f"),
            style="red" if stranded else ("yellow" if queue.redelivered else None),
        )
    return table


def failures_table(failures: Sequence[DeadLetterView], width: int = 70) -> Table:
    """The newest dead letters and why each died."""
    table = Table(title="recent failures (DEAD)", title_justify="left")
    for column in ("seq", "task", "subject", "type", "attempts", "reason"):
        table.add_column(column, overflow="ellipsis", no_wrap=column != "reason")
    for failure in failures:
        reason = " ".join(failure.reason.split())
        table.add_row(
            str(failure.seq),
            failure.task_id or "–",
            failure.subject,
            failure.error_type,
            str(failure.attempts),
            reason[:width],
        )
    return table


def status_view(snapshot: StatusSnapshot) -> Group:
    """All three tables and a one-line summary."""
    taken = time.strftime("%H:%M:%S", time.localtime(snapshot.taken_at))
    summary = (
        f"{len(snapshot.workers)} live worker(s), {snapshot.tasks_stored} task(s) stored in TASKS, "
        f"{snapshot.dead_total} dead letter(s); as of {taken}"
    )
    parts: list[RenderableType] = [
        summary,
        worker_views_table(snapshot.workers),
        queues_table(snapshot.queues),
    ]
    if snapshot.unread:
        listed = ", ".join(f"{subject} ({n})" for subject, n in snapshot.unread.items())
        parts.append(
            Text(
                f"{sum(snapshot.unread.values())} task(s) on subjects no queue reads: {listed}; "
                "publish to tasks.<kind>.<model-token> (docs/protocol.md)",
                style="bold red",
            )
        )
    parts.append(failures_table(snapshot.recent_failures))
    return Group(*parts)


async def _jetstream() -> tuple[NATS, JetStreamContext]:
    settings = ConnectionSettings.from_env(name="d8-status")
    nc = await connect(settings)
    return nc, jetstream(nc, settings)


async def _collect(collector: StatusCollector) -> StatusSnapshot:
    try:
        return await collector.collect()
    except NotFoundError:
        raise ConfigError(
            "the mesh's streams and buckets are not there yet: start `d8 orchestrator` "
            "(or `d8 up`) once against this NATS server; it declares them"
        ) from None


async def status_command(args: argparse.Namespace) -> int:
    """Print the tables once; with `--sample-s`, look twice so the rate has a window."""
    nc, js = await _jetstream()
    try:
        collector = StatusCollector(js)
        snapshot = await _collect(collector)
        if args.sample_s > 0:
            await anyio.sleep(args.sample_s)
            snapshot = await _collect(collector)
    finally:
        await nc.close()
    console.print(status_view(snapshot))
    return 0


async def watch_command(args: argparse.Namespace) -> int:
    """Redraw the tables every `--interval-s` until Ctrl-C (or `--count` redraws)."""
    nc, js = await _jetstream()
    collector = StatusCollector(js)
    drawn = 0
    try:
        # Redrawn in place on a terminal; piped or logged, each snapshot follows the last.
        live = Live(console=console, auto_refresh=False) if console.is_terminal else None
        with live or nullcontext():
            while args.count <= 0 or drawn < args.count:
                view = status_view(await _collect(collector))
                if live is not None:
                    live.update(view, refresh=True)
                else:
                    console.print(f"-- {time.strftime('%Y-%m-%d %H:%M:%S')}")
                    console.print(view)
                drawn += 1
                if args.count <= 0 or drawn < args.count:
                    await anyio.sleep(args.interval_s)
    finally:
        await nc.close()
    return 0


async def workers_command(args: argparse.Namespace) -> int:
    """Print the live workers from the `workers` bucket."""
    nc, js = await _jetstream()
    try:
        heartbeats = await read_heartbeats(js)
    except NotFoundError:
        heartbeats = []
    finally:
        await nc.close()
    now = time.time()
    views = [worker_view(h, now) for h in sorted(heartbeats, key=lambda h: h.worker_id)]
    console.print(worker_views_table(views))
    return 0
