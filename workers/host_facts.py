"""Facts about the machine a worker runs on, for its heartbeat: load, SoC temperature, throttling.

Each fact is optional: a laptop has no `vcgencmd`, a container may hide the thermal zone.
What cannot be read is left out of the heartbeat rather than guessed. The file and command
locations are parameters so that tests can point them at files they write.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field

import anyio

__all__ = [
    "THROTTLE_FLAGS",
    "HostFacts",
    "HostFactsReader",
    "describe_throttled",
    "parse_throttled",
]

logger = logging.getLogger(__name__)

DEFAULT_THERMAL_PATH = "/sys/class/thermal/thermal_zone0/temp"
DEFAULT_VCGENCMD = "vcgencmd"
# `vcgencmd` forks a process and talks to the VideoCore firmware; throttling changes
# slowly, so once every few heartbeats is enough.
THROTTLE_EVERY_S = 30.0
_VCGENCMD_TIMEOUT_S = 2.0

#: Bits of `vcgencmd get_throttled`, as documented by the Raspberry Pi firmware.
THROTTLE_FLAGS = {
    0: "under-voltage",
    1: "frequency capped",
    2: "throttled",
    3: "soft temperature limit",
    16: "under-voltage since boot",
    17: "frequency capped since boot",
    18: "throttled since boot",
    19: "soft temperature limit since boot",
}


def parse_throttled(output: str) -> int | None:
    """The bit field from `vcgencmd get_throttled` output (`throttled=0x50005`), or None."""
    _, sep, value = output.strip().partition("=")
    if not sep:
        return None
    try:
        return int(value, 16)
    except ValueError:
        return None


def describe_throttled(bits: int | None) -> list[str]:
    """The names of the set throttling bits, current conditions first."""
    if not bits:
        return []
    return [name for bit, name in THROTTLE_FLAGS.items() if bits & (1 << bit)]


@dataclass(frozen=True, slots=True)
class HostFacts:
    """One reading; None where the fact could not be read."""

    load_1m: float | None = None
    soc_temp_c: float | None = None
    throttled: int | None = None


@dataclass
class HostFactsReader:
    """Reads host facts off the event loop and keeps the latest for the heartbeat."""

    thermal_path: str = DEFAULT_THERMAL_PATH
    vcgencmd: str | None = field(default_factory=lambda: shutil.which(DEFAULT_VCGENCMD))
    throttle_every_s: float = THROTTLE_EVERY_S
    latest: HostFacts = field(default_factory=HostFacts)
    _throttled: int | None = None
    _throttled_at: float = float("-inf")

    async def refresh(self) -> HostFacts:
        """Read the facts in a worker thread (sysfs and a subprocess may block) and keep them."""
        self.latest = await anyio.to_thread.run_sync(self.read)
        return self.latest

    def read(self) -> HostFacts:
        """Read every fact now, blocking; `refresh` is the async way."""
        return HostFacts(
            load_1m=_load_1m(), soc_temp_c=self._temperature(), throttled=self._throttle()
        )

    def _temperature(self) -> float | None:
        try:
            with open(self.thermal_path) as file:
                raw = file.read().strip()
        except OSError:
            return None
        try:
            # The kernel reports millidegrees Celsius.
            return round(int(raw) / 1000, 1)
        except ValueError:
            return None

    def _throttle(self) -> int | None:
        if self.vcgencmd is None:
            return None
        now = time.monotonic()
        if now - self._throttled_at < self.throttle_every_s:
            return self._throttled
        self._throttled_at = now
        try:
            done = subprocess.run(
                [self.vcgencmd, "get_throttled"],
                capture_output=True,
                text=True,
                timeout=_VCGENCMD_TIMEOUT_S,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            logger.debug("vcgencmd unreadable error=%s", exc)
            self._throttled = None
            return None
        self._throttled = parse_throttled(done.stdout) if done.returncode == 0 else None
        return self._throttled


def _load_1m() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None
