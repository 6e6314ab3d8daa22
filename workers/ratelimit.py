"""A requests-per-minute limit for one worker's calls to a paid API (`--rpm`, `D8_RPM`).

The limit paces calls inside the worker: a task that finds the minute's budget spent waits
for the oldest call to leave the window, while its lease is kept alive by the runtime. It
never nak's the task for this, because a nak costs a delivery attempt and a task could be
dead-lettered without the provider ever being called.
"""

from __future__ import annotations

import logging
import time
from collections import deque

import anyio

from mesh.errors import ConfigError

__all__ = ["RequestLimiter"]

logger = logging.getLogger(__name__)

WINDOW_S = 60.0


class RequestLimiter:
    """Lets at most `rpm` calls start in any sliding 60-second window."""

    # LIMITATION: the count is per worker process; workers sharing one provider account
    # each get the full budget.

    def __init__(self, rpm: float, *, window_s: float = WINDOW_S) -> None:
        if rpm <= 0:
            raise ConfigError(f"--rpm {rpm}: use a positive number of requests per minute")
        # A fractional rpm (0.5: one call every two minutes) widens the window instead.
        self.capacity = max(1, int(rpm))
        self.window_s = window_s * self.capacity / rpm
        self._started: deque[float] = deque()
        self._lock = anyio.Lock()

    def wait_s(self, now: float | None = None) -> float:
        """How long a call starting now would have to wait; 0 when there is budget."""
        now = time.monotonic() if now is None else now
        while self._started and now - self._started[0] >= self.window_s:
            self._started.popleft()
        if len(self._started) < self.capacity:
            return 0.0
        return self._started[0] + self.window_s - now

    async def acquire(self) -> None:
        """Wait for budget, then count one call; callers queue in arrival order."""
        async with self._lock:
            delay_s = self.wait_s()
            if delay_s > 0:
                logger.info(
                    "rpm limit reached, pacing call wait_s=%.1f rpm_window_s=%.0f",
                    delay_s,
                    self.window_s,
                )
                await anyio.sleep(delay_s)
                self.wait_s()
            self._started.append(time.monotonic())
