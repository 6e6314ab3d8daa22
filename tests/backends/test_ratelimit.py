"""The requests-per-minute limit paces calls inside the worker, never beyond its budget."""

from __future__ import annotations

import time

import anyio
import pytest

from mesh.contract import Task
from mesh.errors import ConfigError
from tests.backends.conftest import MODEL, Provider
from workers.backends import BackendSettings, load_backend
from workers.ratelimit import RequestLimiter

pytestmark = pytest.mark.anyio


async def test_calls_beyond_the_budget_wait_for_the_window() -> None:
    limiter = RequestLimiter(2, window_s=0.3)
    started = time.monotonic()
    await limiter.acquire()
    await limiter.acquire()
    assert time.monotonic() - started < 0.1
    await limiter.acquire()
    assert time.monotonic() - started >= 0.29


def test_a_fractional_rate_widens_the_window() -> None:
    limiter = RequestLimiter(0.5)
    assert (limiter.capacity, limiter.window_s) == (1, 120.0)


@pytest.mark.parametrize("rpm", [0, -5])
def test_a_rate_must_be_positive(rpm: float) -> None:
    with pytest.raises(ConfigError, match="use a positive number"):
        RequestLimiter(rpm)


async def test_a_cloud_backend_holds_back_a_call_over_its_rpm(cloud_provider: Provider) -> None:
    settings = BackendSettings(models=(MODEL,), base_url=cloud_provider.base_url, rpm=1)
    async with load_backend(cloud_provider.backend, settings) as backend:
        await backend.generate(Task(id="rpm-1", prompt="first"), MODEL, None)
        with anyio.move_on_after(0.3) as waited:
            await backend.generate(Task(id="rpm-2", prompt="second"), MODEL, None)
    assert waited.cancelled_caught
    assert len(cloud_provider.fake.calls_for("first")) == 1
    assert cloud_provider.fake.calls_for("second") == []
