"""Every subject, stream, consumer and bucket name of the mesh, and the code that declares them.

Nothing else in the project writes one of these names as a literal. Declaring is
idempotent: whoever starts first creates what is missing, and the orchestrator (the owner)
updates streams and consumers in place when settings change.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import nats.errors
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DiscardPolicy,
    KeyValueConfig,
    RePublish,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import NotFoundError

from mesh.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from nats.js import JetStreamContext

__all__ = [
    "ANY_MODEL",
    "DEAD_STREAM",
    "RESULTS_BUCKET",
    "TASKS_STREAM",
    "WORKERS_BUCKET",
    "Capability",
    "TopologySettings",
    "chunk_subject",
    "consumer_config",
    "dead_subject",
    "declare_capability",
    "declare_topology",
    "heartbeat_subject",
    "max_deliveries_advisory_subject",
    "model_token",
    "result_subject",
    "stored_result_subject",
    "task_subject",
]

logger = logging.getLogger(__name__)

TASKS_STREAM = "TASKS"
DEAD_STREAM = "DEAD"
RESULTS_BUCKET = "results"
WORKERS_BUCKET = "workers"
ANY_MODEL = "any"
DEFAULT_KIND = "chat"

_TOKEN_UNSAFE = re.compile(r"[^a-z0-9_-]+")


def model_token(model: str | None) -> str:
    """Map a model name to its subject token: `deepseek-coder:6.7b` -> `deepseek-coder-6-7b`.

    Lowercase, and every run of characters other than `a-z 0-9 _ -` becomes one `-`. Two
    names that differ only in such characters share a token, and so a queue. No model means
    `any`: the task may run on any worker of its kind.
    """
    if model is None:
        return ANY_MODEL
    token = _TOKEN_UNSAFE.sub("-", model.lower()).strip("-")
    if not token:
        raise ValueError(f"model name {model!r} has no letters or digits to make a subject token")
    return token


@dataclass(frozen=True, slots=True)
class Capability:
    """What a worker serves and a queue holds: a task kind and a model token."""

    kind: str
    token: str

    @classmethod
    def for_model(cls, model: str | None, kind: str = DEFAULT_KIND) -> Capability:
        return cls(kind, model_token(model))

    @classmethod
    def from_subject(cls, subject: str) -> Capability:
        _, kind, token = subject.split(".", 2)
        return cls(kind, token)

    @property
    def subject(self) -> str:
        return f"tasks.{self.kind}.{self.token}"

    @property
    def consumer(self) -> str:
        # Reads well in `nats consumer ls TASKS`: chat-any, chat-deepseek-coder-6-7b.
        return f"{self.kind}-{self.token}"

    @property
    def dead_subject(self) -> str:
        return f"dead.{self.kind}.{self.token}"

    def __str__(self) -> str:
        return f"{self.kind}/{self.token}"


def task_subject(model: str | None, kind: str = DEFAULT_KIND) -> str:
    """The subject a task for `model` is published to."""
    return Capability.for_model(model, kind).subject


def dead_subject(task_subject: str) -> str:
    """Where a dead letter from `task_subject` goes: `tasks.x.y` -> `dead.x.y`."""
    return "dead." + task_subject.removeprefix("tasks.")


def stored_result_subject(task_id: str) -> str:
    """Where a result is republished once stored (`results.<id>`); listen here, not on KV."""
    return f"results.{task_id}"


def result_subject(task_id: str) -> str:
    """The KV subject a result is written to (equal to a `kv.put` on `results`)."""
    return f"$KV.{RESULTS_BUCKET}.{task_id}"


def heartbeat_subject(worker_id: str) -> str:
    """The KV subject a worker's heartbeat is written to."""
    return f"$KV.{WORKERS_BUCKET}.{worker_id}"


def chunk_subject(task_id: str) -> str:
    """The core subject a streaming task's output pieces are published on."""
    return f"chunks.{task_id}"


def max_deliveries_advisory_subject() -> str:
    """Advisories JetStream sends when a task used up its deliveries, for every consumer."""
    return f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{TASKS_STREAM}.*"


@dataclass(frozen=True, slots=True)
class TopologySettings:
    """Stream, consumer and bucket settings; durations in seconds."""

    ack_wait_s: float = 30.0
    max_deliver: int = 5
    max_ack_pending: int = 10_000
    duplicate_window_s: float = 120.0
    results_ttl_s: float = 86_400.0
    heartbeat_interval_s: float = 5.0
    dead_max_age_s: float = 7 * 86_400.0
    replicas: int = 1
    tasks_max_bytes: int = -1
    max_msg_size: int = -1

    @property
    def heartbeat_ttl_s(self) -> float:
        return 3 * self.heartbeat_interval_s


def _tasks_stream(settings: TopologySettings) -> StreamConfig:
    return StreamConfig(
        name=TASKS_STREAM,
        subjects=["tasks.>"],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        duplicate_window=settings.duplicate_window_s,
        num_replicas=settings.replicas,
        max_bytes=settings.tasks_max_bytes,
        max_msg_size=settings.max_msg_size,
        discard=DiscardPolicy.NEW,
        # `nats stream view TASKS` pages a work queue only through direct gets.
        allow_direct=True,
    )


def _dead_stream(settings: TopologySettings) -> StreamConfig:
    return StreamConfig(
        name=DEAD_STREAM,
        subjects=["dead.>"],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=settings.dead_max_age_s,
        num_replicas=settings.replicas,
        allow_direct=True,
        # Said outright: left at 0 the server picks 2 minutes, and every declare then saw a
        # difference and updated the stream. A dead letter's id is its task's stream sequence.
        duplicate_window=settings.duplicate_window_s,
    )


def consumer_config(capability: Capability, settings: TopologySettings) -> ConsumerConfig:
    """The shared durable pull consumer of one capability."""
    return ConsumerConfig(
        durable_name=capability.consumer,
        filter_subject=capability.subject,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=settings.ack_wait_s,
        max_deliver=settings.max_deliver,
        max_ack_pending=settings.max_ack_pending,
        max_waiting=512,
        description=f"tasks for {capability}",
    )


_T = TypeVar("_T")


async def _create(what: str, call: Awaitable[_T]) -> _T:
    """Run a create call; a timeout becomes a fix-it error.

    A NATS user without the right to create (a worker under deploy/nats permissions) gets
    no answer at all: the server drops the request and the client times out.
    """
    try:
        return await call
    except nats.errors.TimeoutError:
        raise ConfigError(
            f"{what} is missing and creating it got no answer: this NATS user may not create it "
            "(workers may not), or JetStream is down. Start the orchestrator first: it declares "
            "the streams, buckets and the consumers of the models in its D8_MODELS"
        ) from None


async def _ensure_stream(js: JetStreamContext, config: StreamConfig, *, update: bool) -> None:
    assert config.name is not None
    try:
        info = await js.stream_info(config.name)
    except NotFoundError:
        await _create(f"stream {config.name}", js.add_stream(config))
        logger.info("stream created name=%s", config.name)
        return
    if update and _differs(info.config, config):
        await js.update_stream(config)
        logger.info("stream updated name=%s", config.name)


def _differs(current: object, wanted: object) -> bool:
    """Whether any field set in `wanted` has another value in `current`."""
    for field, value in vars(wanted).items():
        if value is not None and getattr(current, field, None) != value:
            return True
    return False


async def _ensure_bucket(js: JetStreamContext, config: KeyValueConfig, *, update: bool) -> None:
    try:
        await js.key_value(config.bucket)
    except NotFoundError:
        await _create(f"bucket {config.bucket}", js.create_key_value(config))
        logger.info("bucket created name=%s", config.bucket)
        return
    if not update:
        return
    # Settings changed since the bucket was made (a TTL, the replica count, results
    # republished) are applied in place, as for streams; the bucket keeps its keys.
    info = await js.stream_info(f"KV_{config.bucket}")
    current = info.config
    wanted: dict[str, object] = {"max_age": config.ttl, "num_replicas": config.replicas}
    if config.ttl:
        # The server refuses a duplicate window longer than max_age; nats-py sets it so too.
        wanted["duplicate_window"] = min(config.ttl, 120.0)
    if config.limit_marker_ttl:
        wanted["allow_msg_ttl"] = True
        wanted["subject_delete_marker_ttl"] = config.limit_marker_ttl
    changed = [name for name, value in wanted.items() if getattr(current, name) != value]
    republish = config.republish
    if republish is not None and (
        current.republish is None
        or (current.republish.src, current.republish.dest) != (republish.src, republish.dest)
    ):
        current.republish = republish
        changed.append("republish")
    if changed:
        for name, value in wanted.items():
            setattr(current, name, value)
        await js.update_stream(current)
        logger.info("bucket updated name=%s changed=%s", config.bucket, ",".join(changed))


async def declare_topology(
    js: JetStreamContext, settings: TopologySettings, *, update: bool = True
) -> None:
    """Create the streams and buckets that are missing; with `update`, align the rest."""
    await _ensure_stream(js, _tasks_stream(settings), update=update)
    await _ensure_stream(js, _dead_stream(settings), update=update)
    await _ensure_bucket(
        js,
        KeyValueConfig(
            bucket=RESULTS_BUCKET,
            ttl=settings.results_ttl_s,
            history=1,
            replicas=settings.replicas,
            direct=True,
            # Each result is republished on `results.<id>` once the stream has stored it, so
            # a listener never hears of a result that a failover then loses.
            republish=RePublish(src=f"$KV.{RESULTS_BUCKET}.>", dest="results.>"),
        ),
        update=update,
    )
    await _ensure_bucket(
        js,
        KeyValueConfig(
            bucket=WORKERS_BUCKET,
            ttl=settings.heartbeat_ttl_s,
            history=1,
            replicas=settings.replicas,
            direct=True,
            # A delete marker on expiry lets watchers see a worker die (server >= 2.11).
            limit_marker_ttl=max(1.0, settings.heartbeat_interval_s),
        ),
        update=update,
    )


async def declare_capability(
    js: JetStreamContext, capability: Capability, settings: TopologySettings, *, update: bool
) -> ConsumerConfig:
    """Make sure the capability's consumer exists; return its configuration on the server.

    Workers call this with `update=False` so that they never overwrite what the orchestrator
    configured; the orchestrator calls it with `update=True`.
    """
    if not update:
        try:
            info = await js.consumer_info(TASKS_STREAM, capability.consumer)
        except NotFoundError:
            pass
        else:
            config: ConsumerConfig = info.config
            return config
    info = await _create(
        f"consumer {capability.consumer} on {TASKS_STREAM}",
        js.add_consumer(TASKS_STREAM, consumer_config(capability, settings)),
    )
    created: ConsumerConfig = info.config
    return created
