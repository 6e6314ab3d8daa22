"""Routing by live capability: fail fast for a model nobody serves, or follow a fallback chain.

The orchestrator knows which capabilities (`kind/token`) have live workers from their
heartbeats. A task for a capability with none is refused at once with a message that says
what is live, unless the operator configured a chain that names it, for example

    D8_FALLBACK="deepseek-coder:6.7b>llama-3.1-8b-instant>gemini-2.5-flash"

(several chains separated by `;` or `,`). Then the task goes to the first live capability
after it in the chain, with its `model` rewritten; the result's `capability` says which one
ran it. Tasks already queued for a chained capability that has had no live worker for
`D8_FALLBACK_AFTER_S` seconds are moved along the same chain by the `Router.run` loop.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio
import msgspec
import nats.errors

from mesh.contract import decode_task, encode
from mesh.errors import SubmitError
from mesh.settings import env_bool, env_float
from mesh.topology import TASKS_STREAM, Capability, model_token

if TYPE_CHECKING:
    from collections.abc import Mapping

    from nats.aio.msg import Msg
    from nats.js import JetStreamContext

    from mesh.contract import Task
    from orchestrator.core import Orchestrator

__all__ = ["Chain", "Router", "RoutingSettings", "UnservedError", "parse_chains"]

logger = logging.getLogger(__name__)

# How many queued tasks one move step takes from a dead capability's consumer.
_MOVE_BATCH = 64
_FETCH_TIMEOUT_S = 0.5
# The first snapshot of the `workers` bucket takes milliseconds; never wait forever for it.
_LOAD_WAIT_S = 10.0


class UnservedError(SubmitError):
    """No live worker serves the task's capability and no fallback is live."""

    type_name = "unserved"

    def __init__(
        self, capability: Capability, model: str | None, live: set[str], tried: list[str]
    ) -> None:
        self.capability = capability
        self.live = live
        shown = ", ".join(sorted(live)) or "none"
        asked = f"model {model!r}" if model else "any model"
        message = f"no live worker serves {asked} ({capability}); live capabilities: {shown}"
        if tried:
            message += f"; fallbacks tried: {' > '.join(tried)}"
        else:
            message += '; start a worker for it or set D8_FALLBACK="<model>><fallback model>"'
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class Chain:
    """Models in order of preference; a task for one may run on any model after it."""

    models: tuple[str, ...]

    def after(self, token: str) -> tuple[str, ...]:
        """The models after the one whose token is `token`, or () when it is not in the chain."""
        tokens = [model_token(m) for m in self.models]
        return self.models[tokens.index(token) + 1 :] if token in tokens else ()


def parse_chains(raw: str) -> tuple[Chain, ...]:
    """Chains from `a>b>c; d>e`; raises ValueError naming the bad part."""
    chains = []
    for part in (p.strip() for p in raw.replace(",", ";").split(";")):
        if not part:
            continue
        models = tuple(m.strip() for m in part.split(">"))
        if len(models) < 2 or not all(models):
            raise ValueError(f"fallback chain {part!r} needs two or more models joined by '>'")
        for model in models:
            model_token(model)
        chains.append(Chain(models))
    return tuple(chains)


@dataclass(frozen=True, slots=True)
class RoutingSettings:
    """Fallback chains, and when queued tasks of a capability without workers are moved."""

    chains: tuple[Chain, ...] = ()
    #: Refuse tasks nobody serves (False: queue them for a worker that may come later).
    fail_fast: bool = True
    #: A chained capability must have been without live workers this long before its
    #: queued tasks move along the chain.
    move_after_s: float = 30.0
    #: How often the mover looks (it also wakes on every worker change).
    check_every_s: float = 5.0
    #: Move queued tasks at all (the orchestrator does; a plain client only routes new ones).
    move_queued: bool = True

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RoutingSettings:
        """`D8_FALLBACK`, `D8_FAIL_UNSERVED` (default 1) and `D8_FALLBACK_AFTER_S` (default 30)."""
        from mesh.errors import ConfigError

        env = os.environ if env is None else env
        try:
            chains = parse_chains(env.get("D8_FALLBACK", ""))
        except ValueError as exc:
            raise ConfigError(
                f'D8_FALLBACK: {exc}; e.g. D8_FALLBACK="llama3>gemini-2.5-flash"'
            ) from None
        return cls(
            chains=chains,
            fail_fast=env_bool(env, "D8_FAIL_UNSERVED", True),
            move_after_s=env_float(env, "D8_FALLBACK_AFTER_S", cls().move_after_s, minimum=0),
        )


class Router:
    """Chooses a live capability for each task and moves stranded queues along their chain."""

    def __init__(self, orchestrator: Orchestrator, settings: RoutingSettings) -> None:
        self._orchestrator = orchestrator
        self.settings = settings
        self.kind = orchestrator.settings.kind
        self.moved = 0
        self._unserved_since: dict[Capability, float] = {}
        self._live: set[str] = set()
        self._live_version: object = None

    def live(self) -> set[str]:
        """Capabilities with a live worker, recomputed only after the workers changed."""
        # The orchestrator replaces `workers_changed` on every change: it marks the version.
        version = self._orchestrator.workers_changed
        if self._live_version is not version:
            self._live = self._orchestrator.live_capabilities()
            self._live_version = version
        return self._live

    def fallbacks(self, capability: Capability) -> list[str]:
        """Models after `capability` in every chain that names it, in chain order."""
        found: list[str] = []
        for chain in self.settings.chains:
            found.extend(m for m in chain.after(capability.token) if m not in found)
        return found

    async def route(self, task: Task) -> Task:
        """The task to publish: as given, with a fallback model, or UnservedError."""
        if not self._orchestrator.workers_loaded.is_set():
            with anyio.move_on_after(_LOAD_WAIT_S):
                await self._orchestrator.workers_loaded.wait()
        capability = Capability.for_model(task.model, self.kind)
        live = self.live()
        if str(capability) in live:
            return task
        tried = self.fallbacks(capability)
        for model in tried:
            if str(Capability.for_model(model, self.kind)) in live:
                logger.info(
                    "task routed to fallback task_id=%s asked=%s model=%s",
                    task.id,
                    capability,
                    model,
                )
                return msgspec.structs.replace(task, model=model)
        if self.settings.fail_fast:
            raise UnservedError(capability, task.model, live, tried)
        return task

    async def run(self) -> None:
        """Move queued tasks off chained capabilities whose workers are gone, until cancelled."""
        await self._orchestrator.workers_loaded.wait()
        if not self.settings.chains or not self.settings.move_queued:
            return
        while True:
            next_check_s = await self._check()
            with anyio.move_on_after(next_check_s):
                await self._orchestrator.workers_changed.wait()

    async def _check(self) -> float:
        """Move what is due; return how long until the next look."""
        next_check_s = self.settings.check_every_s
        now = time.monotonic()
        live = self.live()
        for capability in self._chained():
            if str(capability) in live:
                self._unserved_since.pop(capability, None)
                continue
            since = self._unserved_since.setdefault(capability, now)
            wait_s = self.settings.move_after_s - (now - since)
            target = next(
                (
                    m
                    for m in self.fallbacks(capability)
                    if str(Capability.for_model(m, self.kind)) in live
                ),
                None,
            )
            if target is None:
                continue
            if wait_s > 0:
                # Look again when the wait is over, even if no worker changes meanwhile.
                next_check_s = min(next_check_s, wait_s)
                continue
            try:
                await self.move_queued(capability, target)
            except (nats.errors.Error, OSError) as exc:
                logger.warning("moving queued tasks failed capability=%s error=%s", capability, exc)
        return next_check_s

    def _chained(self) -> list[Capability]:
        tokens = dict.fromkeys(
            model_token(m) for chain in self.settings.chains for m in chain.models[:-1]
        )
        return [Capability(self.kind, token) for token in tokens]

    async def move_queued(self, source: Capability, model: str) -> int:
        """Republish the tasks queued for `source` to `model`'s queue; return how many moved.

        Each moved task is published before the original is acked, so a crash in between
        leaves a copy in both queues, never in neither; the result is still written once.
        """
        js = self._orchestrator.js
        pending, in_flight = await _queued(js, source)
        if not (pending or in_flight):
            return 0
        target = Capability.for_model(model, self.kind)
        await self._orchestrator._declare(target)
        subscription = await js.pull_subscribe_bind(source.consumer, stream=TASKS_STREAM)
        moved = 0
        try:
            while str(source) not in self.live():
                try:
                    batch = await subscription.fetch(_MOVE_BATCH, timeout=_FETCH_TIMEOUT_S)
                except nats.errors.TimeoutError:
                    break
                for msg in batch:
                    moved += await self._move_one(js, msg, target, model)
        finally:
            await subscription.unsubscribe()
        if pending and not moved:
            # A pull nobody answers: typically a NATS user that may not consume TASKS.
            logger.warning(
                "queued tasks could not be pulled for moving capability=%s pending=%d: "
                "may this NATS user pull from TASKS consumers?",
                source,
                pending,
            )
        if moved:
            self.moved += moved
            logger.warning(
                "queued tasks moved along fallback chain source=%s target=%s count=%d",
                source,
                target,
                moved,
            )
        return moved

    async def _move_one(
        self, js: JetStreamContext, msg: Msg, target: Capability, model: str
    ) -> int:
        try:
            task = decode_task(msg.data)
        except msgspec.DecodeError:
            # A worker of the source dead-letters it with the reason; leave it there.
            await msg.nak()
            return 0
        published_at = msg.metadata.timestamp.timestamp()
        moved = _moved_task(task, model, published_at)
        # The original id is still inside the duplicate window: give the copy its own.
        headers = {"Nats-Msg-Id": f"{task.id}>{target.token}", "D8-Moved-From": msg.subject}
        await js.publish(target.subject, encode(moved), headers=headers)
        await msg.ack_sync()
        return 1


def _moved_task(task: Task, model: str, published_at: float) -> Task:
    """The task for `model`, its relative timeout turned absolute so the move does not extend it."""
    deadline = task.deadline
    if task.timeout_s is not None:
        from_timeout = published_at + task.timeout_s
        deadline = from_timeout if deadline is None else min(deadline, from_timeout)
    return msgspec.structs.replace(task, model=model, deadline=deadline, timeout_s=None)


async def _queued(js: JetStreamContext, capability: Capability) -> tuple[int, int]:
    """The capability's pending and in-flight counts; (0, 0) when it has no consumer."""
    from nats.js.errors import NotFoundError

    try:
        info = await js.consumer_info(TASKS_STREAM, capability.consumer)
    except NotFoundError:
        return 0, 0
    return info.num_pending or 0, info.num_ack_pending or 0
