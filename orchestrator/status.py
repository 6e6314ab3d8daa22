"""The mesh's state as JetStream itself reports it: workers, queues per capability, failures.

Every figure comes from one JetStream API answer, so it agrees with the `nats` CLI:

- live workers and their last heartbeat: the `workers` bucket's keys and values
  (`nats kv ls workers`, `nats kv get workers <id>`);
- pending, in flight, redelivered: `$JS.API.CONSUMER.LIST.TASKS`
  (`nats consumer ls TASKS`, `nats consumer info TASKS <consumer>`);
- dead per capability: `$JS.API.STREAM.INFO.DEAD` with a subjects filter
  (`nats stream subjects DEAD`);
- recent failures: direct gets on `DEAD` from its last sequence (`nats stream get DEAD <seq>`);
- stored tasks, and those on subjects no consumer reads: `$JS.API.STREAM.INFO.TASKS` with
  a subjects filter (`nats stream subjects TASKS`).

"Done" and "rate" need two looks: a consumer's delivered sequence counts every delivery, so
`delivered - in flight` grows by one each time a delivery ends (ack, term, or nak; a retried
task counts once per attempt). The collector keeps those counts for a minute and reports
the growth over the window it has seen.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING

import msgspec
from nats.js.errors import NoKeysError, NotFoundError

from mesh.contract import Heartbeat, decode_heartbeat
from mesh.results import DeadLetter
from mesh.topology import DEAD_STREAM, TASKS_STREAM, WORKERS_BUCKET, Capability
from workers.host_facts import describe_throttled

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable

    from nats.js import JetStreamContext
    from nats.js.api import ConsumerInfo

__all__ = [
    "DeadLetterView",
    "QueueFigures",
    "StatusCollector",
    "StatusSnapshot",
    "WorkerView",
    "read_heartbeats",
    "worker_view",
]

#: How far back "done" looks.
WINDOW_S = 60.0
#: How many dead letters the failures list shows, newest first.
RECENT_FAILURES = 10
# Sequences looked at for them (deleted dead letters leave gaps).
_FAILURE_LOOKBACK = 50


class WorkerView(msgspec.Struct, frozen=True, kw_only=True):
    """A live worker as its last heartbeat shows it."""

    worker_id: str
    host: str
    backend: str
    models: list[str]
    capabilities: list[str]
    in_flight: int
    concurrency: int
    completed: int
    failed: int
    rss_mb: float
    load_1m: float | None
    soc_temp_c: float | None
    throttled: list[str]
    #: Seconds since the worker sent its last heartbeat (by the worker's clock).
    age_s: float


class QueueFigures(msgspec.Struct, frozen=True, kw_only=True):
    """One capability's queue: the figures of its durable consumer and its dead letters."""

    capability: str
    consumer: str
    #: Tasks not yet delivered (`num_pending`).
    pending: int
    #: Delivered and not yet acked (`num_ack_pending`).
    in_flight: int
    #: Of those, delivered more than once (`num_redelivered`).
    redelivered: int
    #: Pull requests waiting on the server (`num_waiting`).
    waiting: int
    #: Dead letters kept for this capability (subject count in `DEAD`).
    dead: int
    #: Live workers that serve it.
    workers: int
    #: Deliveries ended since the consumer was created: delivered sequence - in flight.
    settled: int
    #: Deliveries ended within `window_s` (None until the collector has looked twice).
    done: int | None = None
    window_s: float = 0.0
    #: `done / window_s`, per second.
    rate: float | None = None


class DeadLetterView(msgspec.Struct, frozen=True, kw_only=True):
    """One dead letter: which task, from where, and why."""

    seq: int
    subject: str
    task_id: str | None
    error_type: str
    reason: str
    attempts: int
    worker_id: str | None
    at: float


class StatusSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """Everything `d8 status`, `d8 watch`, `/status` and the dashboard show."""

    taken_at: float
    workers: list[WorkerView]
    queues: list[QueueFigures]
    tasks_stored: int
    dead_total: int
    recent_failures: list[DeadLetterView]
    #: Tasks on subjects that no consumer reads (a raw client's typo, `tasks.chat.any.x`,
    #: a kind no worker serves), per subject: they wait in TASKS for nobody.
    unread: dict[str, int] = {}


def worker_view(heartbeat: Heartbeat, now: float) -> WorkerView:
    """A heartbeat with its age, and throttling bits turned into words."""
    return WorkerView(
        worker_id=heartbeat.worker_id,
        host=heartbeat.host,
        backend=heartbeat.backend,
        models=list(heartbeat.models),
        capabilities=list(heartbeat.capabilities),
        in_flight=heartbeat.in_flight,
        concurrency=heartbeat.concurrency,
        completed=heartbeat.completed,
        failed=heartbeat.failed,
        rss_mb=heartbeat.rss_mb,
        load_1m=heartbeat.load_1m,
        soc_temp_c=heartbeat.soc_temp_c,
        throttled=describe_throttled(heartbeat.throttled),
        age_s=round(max(0.0, now - heartbeat.sent_at), 1),
    )


async def read_heartbeats(js: JetStreamContext) -> list[Heartbeat]:
    """Every live heartbeat in the `workers` bucket (`nats kv ls workers` + `kv get`)."""
    kv = await js.key_value(WORKERS_BUCKET)
    try:
        keys = await kv.keys()
    except NoKeysError:
        return []
    heartbeats = []
    for key in keys:
        try:
            entry = await kv.get(key)
        except (NotFoundError, msgspec.DecodeError):
            continue
        # nats-py returns a server delete marker as an entry without a value.
        if entry.value:
            try:
                heartbeats.append(decode_heartbeat(entry.value))
            except msgspec.DecodeError:
                continue
    return heartbeats


def _unread(stored: dict[str, int], consumers: Iterable[ConsumerInfo]) -> dict[str, int]:
    read = {c.config.filter_subject for c in consumers}
    return {subject: n for subject, n in sorted(stored.items()) if subject not in read and n}


class StatusCollector:
    """Takes snapshots; keeps a minute of consumer counts to say how fast queues drain."""

    def __init__(
        self,
        js: JetStreamContext | Callable[[], JetStreamContext],
        heartbeats: Callable[[], Awaitable[Iterable[Heartbeat]]] | None = None,
        *,
        window_s: float = WINDOW_S,
    ) -> None:
        # A callable is asked at each look: the orchestrator's context exists only once it runs.
        self._js_source = js if callable(js) else (lambda: js)
        self._heartbeats = heartbeats or (lambda: read_heartbeats(self._js_source()))
        self.window_s = window_s
        self._samples: dict[str, deque[tuple[float, int]]] = {}
        self.latest: StatusSnapshot | None = None

    async def collect(self) -> StatusSnapshot:
        """A fresh snapshot, each figure from one JetStream answer."""
        js = self._js_source()
        now = time.time()
        heartbeats = list(await self._heartbeats())
        consumers = await js.consumers_info(TASKS_STREAM)
        dead_info = await js.stream_info(DEAD_STREAM, subjects_filter="dead.>")
        tasks_info = await js.stream_info(TASKS_STREAM, subjects_filter="tasks.>")
        dead_by_subject = dead_info.state.subjects or {}
        serving: dict[str, int] = {}
        for heartbeat in heartbeats:
            for capability in heartbeat.capabilities:
                serving[capability] = serving.get(capability, 0) + 1
        queues = [
            self._figures(info, dead_by_subject, serving, time.monotonic())
            for info in sorted(consumers, key=lambda c: c.name)
        ]
        snapshot = StatusSnapshot(
            taken_at=now,
            workers=[worker_view(h, now) for h in sorted(heartbeats, key=lambda h: h.worker_id)],
            queues=queues,
            tasks_stored=tasks_info.state.messages,
            dead_total=dead_info.state.messages,
            recent_failures=await recent_failures(js, dead_info.state.last_seq),
            unread=_unread(tasks_info.state.subjects or {}, consumers),
        )
        self.latest = snapshot
        return snapshot

    def _figures(
        self,
        info: ConsumerInfo,
        dead_by_subject: dict[str, int],
        serving: dict[str, int],
        now: float,
    ) -> QueueFigures:
        subject = info.config.filter_subject or ""
        capability = Capability.from_subject(subject) if subject.count(".") >= 2 else None
        delivered = info.delivered.consumer_seq if info.delivered else 0
        in_flight = info.num_ack_pending or 0
        settled = max(0, (delivered or 0) - in_flight)
        done, window_s = self._growth(info.name, now, settled)
        return QueueFigures(
            capability=str(capability) if capability else info.name,
            consumer=info.name,
            pending=info.num_pending or 0,
            in_flight=in_flight,
            redelivered=info.num_redelivered or 0,
            waiting=info.num_waiting or 0,
            dead=dead_by_subject.get(capability.dead_subject, 0) if capability else 0,
            workers=serving.get(str(capability), 0) if capability else 0,
            settled=settled,
            done=done,
            window_s=round(window_s, 1),
            rate=round(done / window_s, 2) if done is not None and window_s > 0 else None,
        )

    def _growth(self, consumer: str, now: float, settled: int) -> tuple[int | None, float]:
        """How much `settled` grew over the window kept for `consumer`, and that window."""
        samples = self._samples.setdefault(consumer, deque())
        if samples and settled < samples[-1][1]:
            samples.clear()  # the consumer was re-created: its sequence started again
        samples.append((now, settled))
        # Keep one sample at or beyond the window's start, so a full window can be measured.
        while len(samples) > 2 and samples[1][0] <= now - self.window_s:
            samples.popleft()
        if len(samples) < 2:
            return None, 0.0
        first_at, first = samples[0]
        return settled - first, now - first_at


async def recent_failures(
    js: JetStreamContext, last_seq: int, limit: int = RECENT_FAILURES
) -> list[DeadLetterView]:
    """The newest dead letters, read by direct get from the end of `DEAD`."""
    found: list[DeadLetterView] = []
    seq = last_seq
    while seq > 0 and len(found) < limit and last_seq - seq < _FAILURE_LOOKBACK:
        try:
            msg = await js.get_msg(DEAD_STREAM, seq, direct=True)
        except NotFoundError:
            seq -= 1
            continue
        found.append(_dead_letter_view(seq, msg.subject or "", msg.headers or {}, msg))
        seq -= 1
    return found


def _dead_letter_view(
    seq: int, subject: str, headers: dict[str, str], msg: object
) -> DeadLetterView:
    stamp = getattr(msg, "time", None)
    try:
        attempts = int(headers.get(DeadLetter.ATTEMPTS, "0"))
    except ValueError:
        attempts = 0
    return DeadLetterView(
        seq=seq,
        subject=headers.get(DeadLetter.SUBJECT, subject),
        task_id=headers.get(DeadLetter.TASK_ID),
        error_type=headers.get(DeadLetter.ERROR_TYPE, ""),
        reason=headers.get(DeadLetter.REASON, ""),
        attempts=attempts,
        worker_id=headers.get(DeadLetter.WORKER_ID),
        at=stamp.timestamp() if stamp is not None else 0.0,
    )
