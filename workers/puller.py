"""Pull requests on one durable consumer, with the credit they carry kept in account.

A worker must never be handed more tasks than it has free slots, or a slow Pi would sit on
tasks that an idle worker could run. nats-py's `fetch` waits for one batch at a time, which
costs a round trip per batch and a long poll per empty consumer. Instead each `Puller`
keeps pull requests outstanding (JetStream's `$JS.API.CONSUMER.MSG.NEXT`) and counts the
credit they carry: requested, minus delivered, minus what the server returns unfilled in
`408 Request Timeout` (header `Nats-Pending-Messages`). The worker only asks for more when
it has slots that no outstanding credit already covers.
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    from nats.aio.client import Client as NATS
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription

__all__ = ["Puller"]

logger = logging.getLogger(__name__)

_STATUS = "Status"
_PENDING = "Nats-Pending-Messages"
# After a request's expiry, how long to wait for its 408 before assuming it is gone (its
# status was lost in a reconnect) and taking its credit back.
_EXPIRY_GRACE_S = 2.0


class Puller:
    """Outstanding pull requests on one consumer; deliveries go to `on_task`."""

    def __init__(
        self,
        nc: NATS,
        *,
        api_prefix: str,
        stream: str,
        consumer: str,
        on_task: Callable[[Msg, Puller], None],
        on_change: Callable[[], None],
    ) -> None:
        self.consumer = consumer
        self._nc = nc
        self._next_subject = f"{api_prefix}.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._inbox = nc.new_inbox()
        self._on_task = on_task
        self._on_change = on_change
        self._sub: Subscription | None = None
        self.credit = 0
        self._credit_until = 0.0
        #: When the last request ended with nothing delivered (0: it did deliver). A consumer
        #: starts idle: it gets a probe until it shows it has work.
        self.idle_since = time.monotonic()
        self.delivered = 0

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(self._inbox, cb=self._receive)

    async def stop(self) -> None:
        """Stop receiving; the server drops our outstanding requests once interest is gone.

        LIMITATION: a task the server sent just before our unsubscribe reached it is dropped
        here and redelivered after ack_wait, not at once.
        """
        if self._sub is not None:
            sub, self._sub = self._sub, None
            await sub.unsubscribe()
        self.credit = 0

    async def request(self, batch: int, expires_s: float) -> None:
        """Ask for up to `batch` tasks, waiting at most `expires_s` for them."""
        body = json.dumps({"batch": batch, "expires": int(expires_s * 1e9)}).encode()
        self.credit += batch
        self._credit_until = time.monotonic() + expires_s + _EXPIRY_GRACE_S
        await self._nc.publish(self._next_subject, body, reply=self._inbox)

    def reclaim_lost_credit(self, now: float) -> None:
        """Forget credit of requests that must have ended without telling us."""
        if self.credit and now > self._credit_until:
            logger.warning(
                "pull credit reclaimed consumer=%s credit=%d", self.consumer, self.credit
            )
            self.credit = 0

    def on_reconnect(self) -> None:
        # Requests made before a disconnect may be gone on the server; start afresh.
        self.credit = 0

    async def _receive(self, msg: Msg) -> None:
        status = msg.headers.get(_STATUS) if msg.headers else None
        if status is None:
            self.credit = max(0, self.credit - 1)
            self.delivered += 1
            self.idle_since = 0.0
            self._on_task(msg, self)
            if self.credit == 0:
                # A probe (or the last of a request) was used: ask for more at once, since
                # this consumer has work.
                self._on_change()
            return
        if status == "100":
            return
        pending = msg.headers.get(_PENDING) if msg.headers else None
        if pending is not None and pending.isdigit():
            self.credit = max(0, self.credit - int(pending))
        else:
            self.credit = 0
        if status == "408" and self.credit == 0:
            # Every empty round sends it to the back of the line, or the consumer that
            # first came back empty would be asked first forever and starve the others.
            self.idle_since = time.monotonic()
        if status not in ("404", "408"):
            description = msg.headers.get("Description", "") if msg.headers else ""
            logger.warning(
                "pull request ended consumer=%s status=%s reason=%s",
                self.consumer,
                status,
                description,
            )
        if status == "503":
            # No responders: the consumer has no leader for a moment (a cluster failover).
            # Asking again at once would spin; the feed loop asks on its next round.
            return
        self._on_change()
