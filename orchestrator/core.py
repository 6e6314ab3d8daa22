"""The orchestrator: declares the topology, submits tasks, and learns results and workers.

It watches two things with one subscription each, never by polling: results arrive on the
`results` bucket's subjects, and heartbeats on the `workers` bucket's (a KV watch, which
also shows a worker's expiry through the server's delete markers).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Self

import anyio
import msgspec
import nats.errors
from nats.js.errors import (
    APIError,
    NoStreamResponseError,
    ServiceUnavailableError,
)

from mesh import tracing
from mesh.connection import NATS_ERRORS, ConnectionSettings, close_quietly, connect, jetstream
from mesh.contract import (
    Heartbeat,
    Result,
    Task,
    decode_result,
    decode_task,
    encode,
    is_valid_task_id,
)
from mesh.errors import CorruptResultError, SubmitError, TaskRejectedError, TaskTooLargeError
from mesh.results import get_result, readable_result
from mesh.topology import (
    ANY_MODEL,
    Capability,
    TopologySettings,
    declare_capability,
    declare_topology,
    stored_result_subject,
)
from orchestrator.dead_letters import DeadLetterHandler
from orchestrator.link import NatsLink
from orchestrator.routing import Router, RoutingSettings
from orchestrator.workers_view import WorkersView

if TYPE_CHECKING:
    import asyncio
    from types import TracebackType

    from nats.aio.client import Client as NATS
    from nats.aio.msg import Msg
    from nats.js import JetStreamContext
    from nats.js.api import PubAck

__all__ = ["Orchestrator", "OrchestratorSettings", "Submitted"]

logger = logging.getLogger(__name__)

# nats-py's `publish_async_max_pending` default, and how long a full window may stall.
_ASYNC_MAX_PENDING = 4000
_STALL_S = 30.0
# How long a batch waits for PubAcks before publishing the missing tasks again (the
# server restarted or failed over and the publish or its ack was lost), and how long
# one task is retried while JetStream has no stream leader (4.5 s measured in an election).
_ACK_TIMEOUT_S = 10.0
_SUBMIT_RETRY_S = 15.0
# How long waiting tasks' results are looked up after a reconnect while JetStream fails,
# and the pause between tries (a leader election takes a few seconds).
_LOOKUP_AFTER_RECONNECT_S = 60.0
_LOOKUP_PAUSE_S = 1.0


@dataclass(frozen=True)
class OrchestratorSettings:
    """What the orchestrator needs; durations in seconds."""

    topology: TopologySettings = field(default_factory=TopologySettings)
    connection: ConnectionSettings = field(default_factory=ConnectionSettings)
    kind: str = "chat"
    #: Declare streams, buckets and consumers (the owner does; a plain client may not).
    declare: bool = True
    #: Keep a live view of the workers from their heartbeats.
    watch_workers: bool = True
    #: Route by live capability and fallback chains (needs `watch_workers`); None: off.
    routing: RoutingSettings | None = None


@dataclass(frozen=True, slots=True)
class Submitted:
    """A task the stream accepted: where it went, and whether it was a repeat."""

    task_id: str
    subject: str
    stream_seq: int
    duplicate: bool


OnResult = Callable[[Result], None]
SubmitMany = Callable[[Sequence[Task]], Awaitable[list["Submitted"]]]


class _Waiter:
    __slots__ = ("_event", "on_result", "result")

    def __init__(self, on_result: OnResult | None = None) -> None:
        # Created on first use: `run` waits on one event for the whole batch, not on these.
        self._event: anyio.Event | None = None
        self.result: Result | None = None
        self.on_result = on_result

    @property
    def event(self) -> anyio.Event:
        if self._event is None:
            self._event = anyio.Event()
            if self.result is not None:
                self._event.set()
        return self._event

    def settle(self, result: Result) -> None:
        if self.result is None:
            self.result = result
            if self._event is not None:
                self._event.set()
            if self.on_result is not None:
                self.on_result(result)


class Orchestrator:
    """Submit tasks and wait for results; `async with Orchestrator(settings) as orch`."""

    def __init__(self, settings: OrchestratorSettings | None = None) -> None:
        self.settings = settings or OrchestratorSettings()
        #: Live workers, kept by a watch of the `workers` bucket (with `watch_workers`).
        self.view = WorkersView(lambda: self.js)
        self._waiters: dict[str, list[_Waiter]] = {}
        self._declared: set[Capability] = set()
        self.router: Router | None = None
        #: Called with every result's bytes as it is written (metrics count them).
        self.result_observer: Callable[[bytes], None] | None = None
        #: Handles max-deliveries advisories; only the owner (`declare`) runs one.
        self.dead_letters: DeadLetterHandler | None = None
        #: The connection's state; the HTTP API bounds its NATS calls with it.
        self.link = NatsLink()
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._tasks: anyio.abc.TaskGroup | None = None
        self._task_group_cm: anyio.abc.TaskGroup | None = None

    @property
    def nc(self) -> NATS:
        assert self._nc is not None, "use the orchestrator inside `async with`"
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        assert self._js is not None, "use the orchestrator inside `async with`"
        return self._js

    @property
    def workers(self) -> dict[str, Heartbeat]:
        """Live workers by id, as their last heartbeat shows them."""
        return self.view.workers

    @property
    def workers_changed(self) -> anyio.Event:
        """Set at the next change of `workers` (a new event after each)."""
        return self.view.changed

    @property
    def workers_loaded(self) -> anyio.Event:
        """Set once the first snapshot of the `workers` bucket is in `workers`."""
        return self.view.loaded

    def live_capabilities(self) -> set[str]:
        """Capabilities (`kind/token`) that at least one live worker serves."""
        return self.view.live_capabilities()

    async def __aenter__(self) -> Self:
        self._nc = await connect(
            self.settings.connection,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
        )
        self._js = jetstream(self._nc, self.settings.connection)
        if self.settings.declare:
            await declare_topology(self._js, self.settings.topology, update=True)
            await self._declare(Capability(self.settings.kind, ANY_MODEL))
        await self._nc.subscribe(stored_result_subject("*"), cb=self._on_result)
        if self.settings.declare:
            self.dead_letters = DeadLetterHandler(self._nc, self._js)
            await self.dead_letters.start()
        self._task_group_cm = anyio.create_task_group()
        self._tasks = await self._task_group_cm.__aenter__()
        self._tasks.start_soon(self.link.run)
        if self.settings.watch_workers:
            self._tasks.start_soon(self.view.run)
            if self.settings.routing is not None:
                self.router = Router(self, self.settings.routing)
                self._tasks.start_soon(self.router.run)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        assert self._tasks is not None
        assert self._task_group_cm is not None
        self._tasks.cancel_scope.cancel()
        await self._task_group_cm.__aexit__(None, None, None)
        await close_quietly(self.nc)

    async def _declare(self, capability: Capability) -> None:
        if capability in self._declared or not self.settings.declare:
            return
        await declare_capability(self.js, capability, self.settings.topology, update=True)
        self._declared.add(capability)

    # -- submitting ---------------------------------------------------------------------

    def subject_for(self, task: Task) -> str:
        return Capability.for_model(task.model, self.settings.kind).subject

    async def submit(self, task: Task) -> Submitted:
        """Publish one task; a repeat of an id inside the duplicate window is not stored."""
        data = self._checked(task)  # bad input is refused before anything else
        if self.router is not None:
            routed = await self.router.route(task)
            task, data = (task, data) if routed is task else (routed, self._checked(routed))
        subject = self.subject_for(task)
        await self._declare(Capability.from_subject(subject))
        ack = await self._publish(task, subject, data)
        return Submitted(task.id, subject, ack.seq, bool(ack.duplicate))

    async def _routed(self, task: Task, data: bytes) -> tuple[Task, bytes]:
        assert self.router is not None
        routed = await self.router.route(task)
        return (task, data) if routed is task else (routed, self._checked(routed))

    def _checked(self, task: Task) -> bytes:
        """The task as sent; what a worker would refuse or NATS could not carry fails here."""
        data = encode(task)
        try:
            decode_task(data)
        except msgspec.ValidationError as exc:
            raise TaskRejectedError(f"task {task.id!r} breaks the task contract: {exc}") from None
        if len(data) > self.nc.max_payload:
            raise TaskTooLargeError(
                f"task {task.id} is {len(data)} bytes, over the server's max_payload of "
                f"{self.nc.max_payload} bytes: shorten it, or pass large inputs by reference"
            )
        return data

    async def _publish(
        self, task: Task, subject: str, data: bytes, *, since: float | None = None
    ) -> PubAck:
        """Publish one task and wait for its PubAck, retrying while JetStream fails over.

        Retrying is safe: the task's `Nats-Msg-Id` makes the stream store it once. `since` is
        when an earlier publish of it, whose ack never came, was sent.
        """
        headers = tracing.submit_headers(task.id, subject)
        started = time.monotonic() if since is None else since
        # A publish without an ack may have been stored; "no stream" means none took it.
        maybe_stored = since is not None
        deadline = time.monotonic() + _SUBMIT_RETRY_S
        while True:
            try:
                return await self.js.publish(subject, data, headers=headers)
            except (NoStreamResponseError, ServiceUnavailableError, nats.errors.TimeoutError) as e:
                maybe_stored = maybe_stored or isinstance(e, nats.errors.TimeoutError)
                if time.monotonic() > deadline:
                    raise _unconfirmed(
                        task, subject, time.monotonic() - started, e, maybe_stored=maybe_stored
                    ) from None
                logger.warning("submit retried task_id=%s error=%s", task.id, type(e).__name__)
                await anyio.sleep(0.5)
            except APIError as exc:
                raise SubmitError(
                    f"task {task.id} refused by the server: {exc.description}"
                ) from exc

    async def submit_many(self, tasks: Iterable[Task]) -> list[Submitted]:
        """Publish many tasks with their acks pipelined; returns one `Submitted` per task."""
        started = time.monotonic()
        pending = []
        # All checked before any is sent: a refused batch is not half submitted.
        checked = [(task, self._checked(task)) for task in tasks]
        if self.router is not None:
            checked = [await self._routed(task, data) for task, data in checked]
        for task, data in checked:
            subject = self.subject_for(task)
            await self._declare(Capability.from_subject(subject))
            # With a stall timeout nats-py wraps every publish in a task and a timer and yields
            # to the loop, so each task left in its own write; wait with one only when full.
            stall = _STALL_S if self.js.publish_async_pending() >= _ASYNC_MAX_PENDING - 1 else None
            future = await self.js.publish_async(
                subject,
                data,
                headers=tracing.submit_headers(task.id, subject),
                wait_stall=stall,
            )
            pending.append((task, subject, future))
        submitted = []
        deadline = time.monotonic() + _ACK_TIMEOUT_S
        for task, subject, future in pending:
            ack = await self._ack_of(task, subject, future, deadline, started)
            submitted.append(Submitted(task.id, subject, ack.seq, bool(ack.duplicate)))
        return submitted

    async def _ack_of(
        self,
        task: Task,
        subject: str,
        future: asyncio.Future[PubAck],
        deadline: float,
        started: float,
    ) -> PubAck:
        """A pipelined publish's PubAck; past `deadline` the task is published again."""
        # Most acks are in by the time they are read: no cancel scope and timer for those.
        if future.done():
            waiting: AbstractContextManager[object] = nullcontext()
        else:
            waiting = anyio.move_on_after(max(0.0, deadline - time.monotonic()))
        with waiting:
            try:
                return await future
            except NoStreamResponseError:
                pass  # no stream leader for a moment (a failover): publish it again below
            except APIError as exc:
                raise SubmitError(
                    f"task {task.id} refused by the server: {exc.description}"
                ) from exc
        # The server restarted or failed over: the publish or its ack was lost on the way.
        logger.warning("no ack for a submitted task, publishing it again task_id=%s", task.id)
        return await self._publish(task, subject, self._checked(task), since=started)

    # -- results ------------------------------------------------------------------------

    async def _on_result(self, msg: Msg) -> None:
        task_id = msg.subject.rsplit(".", 1)[-1]
        if self.result_observer is not None and msg.data:
            self.result_observer(msg.data)
        waiters = self._waiters.pop(task_id, None)
        if not waiters or not msg.data:
            return
        try:
            result = decode_result(msg.data)
        except msgspec.DecodeError:
            logger.warning("undecodable result task_id=%s", task_id)
            return
        for waiter in waiters:
            waiter.settle(result)

    async def result(self, task_id: str) -> Result | None:
        """The stored result of a task, or None while it has none."""
        _check_task_id(task_id)
        return await get_result(self.js, task_id)

    async def wait(self, task_id: str, timeout_s: float) -> Result | None:
        """Wait up to `timeout_s` for a task's result; None if it did not come."""
        _check_task_id(task_id)
        waiter = self._register(task_id)
        try:
            # Registered before looking, so a result written in between is not missed.
            stored = await get_result(self.js, task_id)
            if stored is not None:
                return stored
            with anyio.move_on_after(timeout_s):
                await waiter.event.wait()
        finally:
            # Also when cancelled (the HTTP API gives up while NATS is away).
            self._forget(task_id, waiter)
        return waiter.result

    async def run(
        self,
        tasks: Sequence[Task],
        timeout_s: float,
        on_result: OnResult | None = None,
        *,
        submit: SubmitMany | None = None,
    ) -> tuple[list[Submitted], dict[str, Result]]:
        """Submit a batch and wait up to `timeout_s` for its results.

        Waiters are registered before the tasks are published, so no result can slip past;
        only repeats (already run within the duplicate window) are looked up in the bucket.
        `submit` replaces `submit_many` for the publishing (the HTTP API bounds it).
        """
        unsettled = {task.id for task in tasks}
        all_settled = anyio.Event()

        def settled(result: Result) -> None:
            unsettled.discard(result.id)
            if not unsettled:
                all_settled.set()
            if on_result is not None:
                on_result(result)

        waiters = {task.id: self._register(task.id, settled) for task in tasks}
        try:
            submitted = await (submit or self.submit_many)(tasks)
            await self._settle_repeats(submitted, waiters, unsettled)
            deadline = time.monotonic() + timeout_s
            # One event for the batch: a cancel scope and an event per task cost more than
            # the rest of the orchestrator's share of a short task.
            if unsettled:
                with anyio.move_on_after(max(0.0, deadline - time.monotonic())):
                    await all_settled.wait()
        finally:
            for task_id, waiter in waiters.items():
                self._forget(task_id, waiter)
        results = {task_id: w.result for task_id, w in waiters.items() if w.result is not None}
        return submitted, results

    async def _settle_repeats(
        self, submitted: list[Submitted], waiters: dict[str, _Waiter], unsettled: set[str]
    ) -> None:
        """Settle repeats of tasks already run from the bucket; they will not run again."""
        for item in submitted:
            if not item.duplicate:
                continue
            try:
                stored = await get_result(self.js, item.task_id)
            except CorruptResultError as exc:
                # The bad value also blocks the worker's create-only write: none will come.
                logger.warning("stored result unreadable task_id=%s error=%s", exc.task_id, exc)
                unsettled.discard(item.task_id)
                continue
            if stored is not None:
                waiters[item.task_id].settle(stored)

    def _register(self, task_id: str, on_result: OnResult | None = None) -> _Waiter:
        waiter = _Waiter(on_result)
        self._waiters.setdefault(task_id, []).append(waiter)
        return waiter

    def _forget(self, task_id: str, waiter: _Waiter) -> None:
        waiters = self._waiters.get(task_id)
        if waiters and waiter in waiters:
            waiters.remove(waiter)
            if not waiters:
                del self._waiters[task_id]

    async def _on_disconnected(self) -> None:
        # As `connect`'s default callback, which this one replaces, plus the link's state.
        if not (self.nc.is_closed or self.nc.is_draining):
            logger.warning("nats disconnected name=%s", self.settings.connection.name)
            self.link.disconnected()

    async def _on_reconnected(self) -> None:
        self.link.reconnected()
        self.view.rewatch()
        # Not awaited here: nats-py runs this callback inside its reconnect, and after a
        # failover the lookups may wait for a leader election; an error raised here would
        # leave the client stuck reconnecting.
        if self._tasks is not None:
            self._tasks.start_soon(self._look_up_waiting)

    async def _look_up_waiting(self) -> None:
        """Look up the results of waiting tasks: those stored while we were away did not
        reach the subscription. Retried while JetStream cannot answer, for a bounded time."""
        remaining = list(self._waiters)
        logger.warning(
            "nats reconnected, checking results of waiting tasks count=%d", len(remaining)
        )
        deadline = time.monotonic() + _LOOKUP_AFTER_RECONNECT_S
        while remaining:
            task_id = remaining[-1]
            if task_id not in self._waiters:  # settled by the subscription meanwhile
                remaining.pop()
                continue
            try:
                stored = await readable_result(self.js, task_id)
            except NATS_ERRORS as exc:
                if time.monotonic() >= deadline:
                    logger.warning(
                        "results of waiting tasks not checked count=%d error=%r",
                        len(remaining),
                        exc,
                    )
                    return
                await anyio.sleep(_LOOKUP_PAUSE_S)
                continue
            remaining.pop()
            if stored is not None:
                for waiter in self._waiters.pop(task_id, []):
                    waiter.settle(stored)


def _check_task_id(task_id: str) -> None:
    # A wildcard or a dot would make a lookup match some other task's result.
    if not is_valid_task_id(task_id):
        raise TaskRejectedError(f"{task_id!r} is not a task id: use 1 to 128 of A-Z a-z 0-9 _ -")


def _unconfirmed(
    task: Task, subject: str, elapsed_s: float, error: Exception, *, maybe_stored: bool
) -> SubmitError:
    """The error for a task no stream confirmed: whether it may still run decides the advice."""
    if maybe_stored:
        return SubmitError(
            f"NATS did not confirm task {task.id} on {subject} within {elapsed_s:.0f}s "
            f"({type(error).__name__}); it may still run: resubmit with the same id, which is "
            "deduplicated"
        )
    return SubmitError(
        f"no stream took task {task.id} on {subject} within {elapsed_s:.0f}s "
        f"({type(error).__name__}), so it was not stored: is JetStream up and TASKS declared? "
        "Submitting again is safe, the id makes it run once"
    )
