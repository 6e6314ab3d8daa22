"""Failing fast while NATS is away: the HTTP API answers 503 at once instead of hanging.

nats-py keeps a request going while it reconnects: the publish waits in its buffer, and
the caller learns nothing until the request's own timeout (10 s for JetStream), or a
submit's retries (30 s). A buffered publish is still sent once the server is back, so a
task refused that way would run anyway. `NatsLink.call` refuses before sending anything
while the connection is down, and cancels a call in progress once NATS has been away for
`grace_s`, which is long enough for a cluster failover (about 0.5 s to reconnect).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, TypeVar

import anyio
import nats.errors

from mesh.errors import NatsUnreachableError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

__all__ = ["GRACE_S", "NatsLink"]

T = TypeVar("T")

#: How long NATS may be away before calls give up: a failover reconnects well within it.
GRACE_S = 2.0
# What a call raises when NATS went away or did not answer (not a refusal by the server).
_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    TimeoutError,
    OSError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.StaleConnectionError,
    nats.errors.OutboundBufferLimitError,
)


class NatsLink:
    """The connection's state, from nats-py's callbacks, and calls bounded by it."""

    def __init__(self, grace_s: float = GRACE_S) -> None:
        self.grace_s = grace_s
        self._lost_at: float | None = None
        self._lost = anyio.Event()
        self._back = anyio.Event()
        self._back.set()
        self._calls: set[anyio.CancelScope] = set()

    @property
    def is_connected(self) -> bool:
        return self._lost_at is None

    def away_s(self) -> float:
        """Seconds since the connection was lost; 0 while it is up."""
        return 0.0 if self._lost_at is None else time.monotonic() - self._lost_at

    def disconnected(self) -> None:
        """Called when nats-py starts reconnecting."""
        if self._lost_at is None:
            self._lost_at = time.monotonic()
            self._back = anyio.Event()
            self._lost.set()

    def reconnected(self) -> None:
        """Called when nats-py is connected again."""
        self._lost_at = None
        self._lost = anyio.Event()
        self._back.set()

    async def _back_within_grace(self) -> bool:
        back = self._back
        with anyio.move_on_after(max(0.0, self.grace_s - self.away_s())):
            await back.wait()
        return back.is_set()

    async def run(self) -> None:
        """Cancel the calls in progress whenever NATS stays away past the grace period.

        Runs until cancelled with the orchestrator's task group; each turn waits for one
        disconnection.
        """
        while True:
            await self._lost.wait()
            back = self._back
            if await self._back_within_grace():
                continue
            for scope in self._calls:
                scope.cancel()
            await back.wait()

    async def call(
        self, call: Callable[[], Awaitable[T]], action: str, task_ids: tuple[str, ...] = ()
    ) -> T:
        """`call()`, or NatsUnreachableError once NATS has been away for `grace_s`.

        Args:
            action: what the call does, for the message ("read the result of t1").
            task_ids: the tasks a submit sends; the message then says whether they may run.
        """
        if not self.is_connected and not await self._back_within_grace():
            # Nothing was sent: a submit refused here is not stored later.
            raise NatsUnreachableError(action, sent=False, away_s=self.away_s(), task_ids=task_ids)
        scope = anyio.CancelScope()
        self._calls.add(scope)
        try:
            with scope:
                return await call()
        except NatsUnreachableError:
            raise  # a ConnectionError, so also one of the transport errors below
        except _TRANSPORT_ERRORS as exc:
            raise NatsUnreachableError(
                action,
                sent=True,
                away_s=self.away_s(),
                task_ids=task_ids,
                reason=f"no answer: {type(exc).__name__}",
            ) from exc
        finally:
            self._calls.discard(scope)
        raise NatsUnreachableError(action, sent=True, away_s=self.away_s(), task_ids=task_ids)
