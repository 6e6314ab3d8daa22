"""The worker: pulls tasks it has room for, runs them, heartbeats, and shuts down in order."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import platform
import re
import socket
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import anyio

import mesh
from mesh import tracing
from mesh.connection import (
    NATS_ERRORS,
    ConnectionSettings,
    api_prefix,
    close_quietly,
    connect,
    jetstream,
)
from mesh.contract import Heartbeat, encode
from mesh.results import delete_heartbeat
from mesh.topology import (
    ANY_MODEL,
    DEFAULT_KIND,
    TASKS_STREAM,
    WORKERS_BUCKET,
    Capability,
    TopologySettings,
    declare_capability,
    declare_topology,
    heartbeat_subject,
    model_token,
)
from workers.backends import BackendSettings, load_backend
from workers.execution import RetryPolicy, TaskRunner
from workers.host_facts import HostFactsReader
from workers.puller import Puller

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS
    from nats.aio.msg import Msg
    from nats.js import JetStreamContext

    from mesh.errors import WorkerFatalError
    from workers.backends import Backend

__all__ = ["Worker", "WorkerSettings", "default_worker_id", "rss_mb"]

logger = logging.getLogger(__name__)

_UNSAFE_ID = re.compile(r"[^A-Za-z0-9_-]+")
# Pull requests wait this long on the server; also bounds how long shutdown waits for them.
PULL_EXPIRES_S = 5.0
# Probes of idle consumers (and turns, with fewer slots than consumers) last this long: the
# most a new task waits on an idle consumer, and the feed loop's own wake-up interval.
ROTATE_EXPIRES_S = 1.0


def default_worker_id(backend: str) -> str:
    """`<host>-<backend>-<pid>`, made subject-safe."""
    return _UNSAFE_ID.sub("-", f"{socket.gethostname()}-{backend}-{os.getpid()}").strip("-")


def rss_mb() -> float:
    """This process's resident memory in MB (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 1e6, 1)


@dataclass(frozen=True)
class WorkerSettings:
    """Everything a worker needs to know; durations in seconds."""

    backend: str = "echo"
    backend_settings: BackendSettings = field(default_factory=BackendSettings)
    concurrency: int | None = None
    worker_id: str | None = None
    serve_any: bool = True
    kind: str = DEFAULT_KIND
    grace_s: float = 30.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    topology: TopologySettings = field(default_factory=TopologySettings)
    connection: ConnectionSettings = field(default_factory=ConnectionSettings)


class Worker:
    """One worker process's runtime. `await worker.run()` serves until `stop()`."""

    def __init__(self, settings: WorkerSettings, backend: Backend | None = None) -> None:
        self.settings = settings
        self.backend = backend or load_backend(settings.backend, settings.backend_settings)
        self.worker_id = settings.worker_id or default_worker_id(self.backend.name)
        self.concurrency = settings.concurrency or self.backend.default_concurrency
        self.started_at = time.time()
        self.completed = 0
        self.failed = 0
        self.fatal: WorkerFatalError | None = None
        self.ready = anyio.Event()
        #: Load, SoC temperature and throttling for the heartbeat; tests may swap the paths.
        self.host_facts = HostFactsReader()
        self._stop = anyio.Event()
        self._changed = anyio.Event()
        self._stopping = False
        self._leaving = False
        self._in_flight: dict[int, tuple[Msg, float]] = {}
        self._held: list[Msg] = []
        # Started tasks wait here for one of `concurrency` long-lived runners.
        self._startable: asyncio.Queue[Msg] = asyncio.Queue()
        self._pullers: list[Puller] = []
        self._ack_wait_s = settings.topology.ack_wait_s
        self._beat_s = settings.topology.heartbeat_interval_s
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._runner: TaskRunner | None = None
        self._tasks: anyio.abc.TaskGroup | None = None

    @property
    def capabilities(self) -> list[Capability]:
        served = [Capability(self.settings.kind, model_token(m)) for m in self.backend.models]
        if self.settings.serve_any:
            served.append(Capability(self.settings.kind, ANY_MODEL))
        return list(dict.fromkeys(served))

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def stop(self) -> None:
        """Ask the worker to shut down gracefully (what SIGTERM does)."""
        self._stop.set()

    def _on_fatal(self, exc: WorkerFatalError) -> None:
        if self.fatal is None:
            self.fatal = exc
            logger.error("worker cannot serve, stopping worker_id=%s error=%s", self.worker_id, exc)
        self._stop.set()

    async def run(self) -> None:
        """Connect, declare, serve until stopped, then shut down in order."""
        async with self.backend:
            self._nc = await connect(self.settings.connection, reconnected_cb=self._on_reconnected)
            try:
                await self._serve(self._nc)
            finally:
                await close_quietly(self._nc)
                logger.info(
                    "worker stopped worker_id=%s completed=%d", self.worker_id, self.completed
                )

    async def _serve(self, nc: NATS) -> None:
        js = self._js = jetstream(nc, self.settings.connection)
        await declare_topology(js, self.settings.topology, update=False)
        self._beat_s = await self._heartbeat_interval(js)
        ack_waits, max_delivers = [], []
        for capability in self.capabilities:
            config = await declare_capability(js, capability, self.settings.topology, update=False)
            ack_waits.append(float(config.ack_wait or self.settings.topology.ack_wait_s))
            max_delivers.append(config.max_deliver or self.settings.retry.max_deliver)
            self._pullers.append(
                Puller(
                    nc,
                    api_prefix=api_prefix(self.settings.connection),
                    stream=TASKS_STREAM,
                    consumer=capability.consumer,
                    on_task=self._on_task,
                    on_change=self._notify,
                )
            )
        self._ack_wait_s = min(ack_waits)
        self._runner = TaskRunner(
            nc=nc,
            js=js,
            backend=tracing.traced_backend(self.backend),
            worker_id=self.worker_id,
            retry=replace(self.settings.retry, max_deliver=min(max_delivers)),
            on_fatal=self._on_fatal,
        )
        # Tracing off: the runner itself, no wrapper on the hot path.
        self._runner = tracing.traced_runner(self._runner)
        for puller in self._pullers:
            await puller.start()

        async with anyio.create_task_group() as services, anyio.create_task_group() as tasks:
            self._tasks = tasks
            # A task per delivery (anyio wraps each in a cancel scope and an event) cost more
            # than the rest of an echo task's worker share; runners live as long as the worker.
            for _ in range(self.concurrency):
                tasks.start_soon(self._run_tasks)
            services.start_soon(self._feed)
            services.start_soon(self._beat)
            services.start_soon(self._keep_leases)
            logger.info(
                "worker ready worker_id=%s backend=%s models=%s concurrency=%d capabilities=%s",
                self.worker_id,
                self.backend.name,
                ",".join(self.backend.models),
                self.concurrency,
                ",".join(str(c) for c in self.capabilities),
            )
            self.ready.set()
            await self._stop.wait()
            await self._shut_down(tasks)
            tasks.cancel_scope.cancel()
            services.cancel_scope.cancel()

    def _on_task(self, msg: Msg, puller: Puller) -> None:
        # Only a redelivery can be running here already; the scan costs O(in flight).
        if msg.metadata.num_delivered > 1 and self._is_running_here(msg):
            # This worker stalled past ack_wait (swap, a paused VM) and got its own task
            # back. The running attempt settles it (acks count per stream sequence); a
            # second run would only lose the create-once race for the result.
            logger.warning(
                "redelivery of a task running here ignored stream_seq=%d attempt=%d worker_id=%s",
                msg.metadata.sequence.stream,
                msg.metadata.num_delivered,
                self.worker_id,
            )
            return
        if self._stopping or len(self._in_flight) >= self.concurrency or self._tasks is None:
            # Delivered beyond our free slots (a request outlived a reconnect) or while
            # stopping: keep it, never drop it; it runs later or is handed back.
            self._held.append(msg)
            return
        self._start(msg)

    def _is_running_here(self, msg: Msg) -> bool:
        seq = msg.metadata.sequence.stream
        running = [m for m, _ in self._in_flight.values()] + self._held
        return any(m.metadata.sequence.stream == seq for m in running)

    def _start(self, msg: Msg) -> None:
        assert self._tasks is not None
        self._in_flight[id(msg)] = (msg, time.monotonic())
        self._startable.put_nowait(msg)

    async def _run_tasks(self) -> None:
        """One runner: take started tasks one after another until cancelled at shutdown."""
        while True:
            await self._run_one(await self._startable.get())

    async def _run_one(self, msg: Msg) -> None:
        assert self._runner is not None
        try:
            outcome = await self._runner.run(msg)
        except anyio.get_cancelled_exc_class():
            # Shutdown ran out of grace: hand the task back at once, not after ack_wait.
            with anyio.move_on_after(2, shield=True):
                await msg.nak()
            raise
        except Exception:
            # Only NATS trouble gets here (the runner turns task trouble into outcomes); the
            # task is redelivered after ack_wait.
            metadata = msg.metadata
            logger.exception(
                "task settle failed worker_id=%s subject=%s stream_seq=%d attempt=%d",
                self.worker_id,
                msg.subject,
                metadata.sequence.stream,
                metadata.num_delivered,
            )
            self.failed += 1
        else:
            if outcome.status == "ok":
                self.completed += 1
            elif outcome.status not in ("duplicate", "late", "retry", "returned"):
                self.failed += 1
            if logger.isEnabledFor(logging.INFO):
                logger.info(
                    "task %s task_id=%s attempt=%d worker_id=%s",
                    outcome.status,
                    outcome.task_id,
                    outcome.attempt,
                    self.worker_id,
                )
        finally:
            del self._in_flight[id(msg)]
            if self._held and not self._stopping:
                self._start(self._held.pop(0))
            if self._stopping or self._feed_would_pull():
                self._changed.set()

    def _free_slots(self) -> int:
        credit = sum(p.credit for p in self._pullers)
        return self.concurrency - len(self._in_flight) - len(self._held) - credit

    def _feed_would_pull(self) -> bool:
        """Whether `_feed` would ask for more now: it tops a consumer up in steps of half its
        limit, or at once when it has no credit left; waking it after every task cost more
        than the tasks it then did not ask for."""
        free = self._free_slots()
        if free <= 0:
            return False
        return any(
            p.credit == 0 or min(limit - p.credit, free) >= max(1, limit // 2)
            for p, limit, _ in self._credit_limits()
        )

    def _credit_limits(self) -> list[tuple[Puller, int, float]]:
        """Which consumers to ask, in order: how much credit each may hold, for how long.

        A consumer whose last request came back empty keeps a probe of one slot outstanding
        for a short while, so new work there is seen within a second; the consumers that have
        work share the rest. With slots to spare the probes go first; with few, consumers
        that have work do. With fewer slots than consumers they take turns, the one that came
        back empty longest ago first.
        """
        pullers = self._pullers
        if self.concurrency < len(pullers):
            order = sorted(pullers, key=lambda p: p.idle_since)
            return [(p, 1, ROTATE_EXPIRES_S) for p in order]
        idle = [p for p in pullers if p.idle_since]
        busy = [p for p in pullers if not p.idle_since]
        share = math.ceil((self.concurrency - len(idle)) / len(busy)) if busy else 1
        probes = [(p, 1, ROTATE_EXPIRES_S) for p in idle]
        shares = [(p, share, PULL_EXPIRES_S) for p in busy]
        return probes + shares if self.concurrency >= 2 * len(pullers) else shares + probes

    async def _feed(self) -> None:
        """Keep pull requests outstanding for every free slot."""
        while not self._stopping:
            self._changed = anyio.Event()
            if self._runner is not None and (pause_s := self._runner.paused_s()) > 0:
                # Rate limited: leave the tasks in JetStream, where a worker on another
                # account or backend can take them, until the limit has passed.
                with anyio.move_on_after(pause_s):
                    await self._changed.wait()
                continue
            now = time.monotonic()
            for puller in self._pullers:
                puller.reclaim_lost_credit(now)
            free = self._free_slots()
            for puller, limit, expires_s in self._credit_limits():
                if free <= 0:
                    break
                want = min(limit - puller.credit, free)
                if want >= 1 and (puller.credit == 0 or want >= max(1, limit // 2)):
                    await puller.request(want, expires_s)
                    free -= want
            with anyio.move_on_after(ROTATE_EXPIRES_S):
                await self._changed.wait()

    async def _keep_leases(self) -> None:
        """Tell JetStream that long tasks are still running, so it does not redeliver them."""
        while True:
            interval_s = max(0.2, self._ack_wait_s / 3)
            await anyio.sleep(interval_s)
            now = time.monotonic()
            for msg, started in list(self._in_flight.values()):
                if now - started >= interval_s * 0.9:
                    await msg.in_progress()
            for msg in self._held:
                await msg.in_progress()

    def heartbeat(self) -> Heartbeat:
        return Heartbeat(
            worker_id=self.worker_id,
            host=socket.gethostname(),
            arch=platform.machine(),
            capabilities=[str(c) for c in self.capabilities],
            backend=self.backend.name,
            models=list(self.backend.models),
            concurrency=self.concurrency,
            in_flight=len(self._in_flight),
            started_at=self.started_at,
            version=mesh.__version__,
            rss_mb=rss_mb(),
            completed=self.completed,
            failed=self.failed,
            sent_at=time.time(),
            load_1m=self.host_facts.latest.load_1m,
            soc_temp_c=self.host_facts.latest.soc_temp_c,
            throttled=self.host_facts.latest.throttled,
        )

    async def _beat(self) -> None:
        assert self._nc is not None
        subject = heartbeat_subject(self.worker_id)
        while not self._leaving:
            try:
                await self.host_facts.refresh()
                if self._leaving:
                    # The heartbeat is being removed: a beat now would bring it back.
                    break
                await self._nc.publish(subject, encode(self.heartbeat()))
            except Exception as exc:  # a missed beat is logged; the next one may pass
                logger.warning("heartbeat failed worker_id=%s error=%s", self.worker_id, exc)
            await anyio.sleep(self._beat_s)

    async def _heartbeat_interval(self, js: JetStreamContext) -> float:
        """How often to beat: as configured, unless the `workers` bucket forgets sooner.

        Whoever created the bucket set its TTL; a worker told to beat less often than a third
        of it would vanish between its own beats and come back, and routing would flap.
        """
        own = self.settings.topology.heartbeat_interval_s
        info = await js.stream_info(f"KV_{WORKERS_BUCKET}")
        ttl = info.config.max_age or 0.0
        if ttl <= 0 or own <= ttl / 3:
            return own
        logger.warning(
            "heartbeat every %.3gs, not %.3gs: the %s bucket keeps a heartbeat %.3gs "
            "(D8_HEARTBEAT_S of whoever created it)",
            ttl / 3,
            own,
            WORKERS_BUCKET,
            ttl,
        )
        return ttl / 3

    def _notify(self) -> None:
        self._changed.set()

    async def _on_reconnected(self) -> None:
        logger.warning("nats reconnected worker_id=%s", self.worker_id)
        for puller in self._pullers:
            puller.on_reconnect()
        self._changed.set()

    async def _shut_down(self, tasks: anyio.abc.TaskGroup) -> None:
        """Stop fetching, finish or hand back in-flight tasks, leave, in that order."""
        assert self._nc is not None
        self._stopping = True
        self._changed.set()
        logger.info(
            "worker stopping worker_id=%s in_flight=%d", self.worker_id, len(self._in_flight)
        )
        try:
            for puller in self._pullers:
                await puller.stop()
            await self._nc.flush(timeout=2)
            for msg in self._held:
                await msg.nak()
        except NATS_ERRORS as exc:
            # NATS is away: the server hands these back itself once their ack wait passes.
            logger.warning(
                "could not hand back held tasks worker_id=%s error=%r", self.worker_id, exc
            )
        self._held.clear()

        with anyio.move_on_after(0 if self.fatal else self.settings.grace_s):
            while self._in_flight:
                await self._wait_changed()
        if self._in_flight:
            logger.warning(
                "grace over, handing back tasks worker_id=%s count=%d",
                self.worker_id,
                len(self._in_flight),
            )
            tasks.cancel_scope.cancel()

        # No beat may follow the removal: on one connection the server sees them in order.
        self._leaving = True
        try:
            with anyio.move_on_after(5, shield=True):
                await delete_heartbeat(self._nc, self.worker_id)
        except NATS_ERRORS as exc:
            # It expires with its TTL instead.
            logger.warning("heartbeat not removed worker_id=%s error=%r", self.worker_id, exc)
        else:
            logger.info("heartbeat removed worker_id=%s", self.worker_id)

    async def _wait_changed(self) -> None:
        self._changed = anyio.Event()
        await self._changed.wait()
