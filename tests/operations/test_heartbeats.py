"""Heartbeats that tell the truth: host facts, and a killed worker noticed by the KV watch."""

from __future__ import annotations

import logging
import signal
import time
from typing import TYPE_CHECKING

import pytest

from mesh.topology import TopologySettings
from orchestrator.status import read_heartbeats
from tests.helpers import (
    WorkerProcess,
    orchestrator_for,
    poll_until,
    running_worker,
    worker_settings,
)
from workers.host_facts import HostFactsReader, describe_throttled, parse_throttled

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.anyio


def _fake_vcgencmd(tmp_path: Path, output: str, code: int = 0) -> str:
    script = tmp_path / "vcgencmd"
    script.write_text(f"#!/bin/sh\necho '{output}'\nexit {code}\n")
    script.chmod(0o755)
    return str(script)


@pytest.mark.parametrize(
    ("output", "bits"),
    [
        ("throttled=0x0", 0),
        ("throttled=0x50005", 0x50005),
        ("throttled=0x80000", 0x80000),
        ("VCHI initialization failed", None),
        ("throttled=zz", None),
    ],
)
def test_throttled_output_is_parsed_or_left_out(output: str, bits: int | None) -> None:
    assert parse_throttled(output) == bits


def test_throttled_bits_are_named_current_conditions_first() -> None:
    assert describe_throttled(0x50005) == [
        "under-voltage",
        "throttled",
        "under-voltage since boot",
        "throttled since boot",
    ]
    assert describe_throttled(0) == describe_throttled(None) == []


def test_host_facts_come_from_the_injected_paths(tmp_path: Path) -> None:
    thermal = tmp_path / "temp"
    thermal.write_text("48312\n")
    reader = HostFactsReader(
        thermal_path=str(thermal), vcgencmd=_fake_vcgencmd(tmp_path, "throttled=0x50005")
    )
    facts = reader.read()
    assert (facts.soc_temp_c, facts.throttled) == (48.3, 0x50005)
    assert facts.load_1m is not None and facts.load_1m >= 0


def test_unreadable_host_facts_are_none_not_guesses(tmp_path: Path) -> None:
    garbled = tmp_path / "temp"
    garbled.write_text("warm\n")
    failing = _fake_vcgencmd(tmp_path, "VCHI initialization failed", code=255)
    assert HostFactsReader(thermal_path=str(garbled), vcgencmd=failing).read().soc_temp_c is None
    assert (
        HostFactsReader(thermal_path=str(tmp_path / "missing"), vcgencmd=failing).read().throttled
        is None
    )
    laptop = HostFactsReader(thermal_path=str(tmp_path / "missing"), vcgencmd=None).read()
    assert (laptop.soc_temp_c, laptop.throttled) == (None, None)


async def test_heartbeats_carry_host_facts(nats_url: str, tmp_path: Path) -> None:
    thermal = tmp_path / "temp"
    thermal.write_text("61000\n")
    async with (
        orchestrator_for(nats_url) as orch,
        running_worker(worker_settings(nats_url, worker_id="pi")) as worker,
    ):
        worker.host_facts = HostFactsReader(
            thermal_path=str(thermal), vcgencmd=_fake_vcgencmd(tmp_path, "throttled=0x4")
        )
        await poll_until(
            lambda: "pi" in orch.workers and orch.workers["pi"].soc_temp_c == 61.0, what="facts"
        )
        heartbeat = orch.workers["pi"]
        stored = {h.worker_id: h for h in await read_heartbeats(orch.js)}["pi"]
    assert heartbeat.throttled == 4 and describe_throttled(heartbeat.throttled) == ["throttled"]
    assert heartbeat.load_1m is not None
    assert stored.soc_temp_c == 61.0


async def test_a_killed_worker_is_noticed_within_ttl_plus_one_interval(
    nats_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    topology = TopologySettings(heartbeat_interval_s=1.0)
    bound_s = topology.heartbeat_ttl_s + topology.heartbeat_interval_s
    caplog.set_level(logging.WARNING, logger="orchestrator.core")
    async with orchestrator_for(nats_url, topology=topology) as orch:
        doomed = WorkerProcess(
            nats_url,
            "--worker-id",
            "doomed",
            env={"D8_HEARTBEAT_S": "1"},
            log_path=tmp_path / "w.log",
        )
        try:
            await poll_until(lambda: "doomed" in orch.workers, timeout_s=20, what="worker")
            doomed.process.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            await poll_until(
                lambda: "doomed" not in orch.workers, timeout_s=bound_s + 5, what="expiry"
            )
            noticed_s = time.monotonic() - killed_at
        finally:
            doomed.stop()
        left = await read_heartbeats(orch.js)

    print(f"killed worker noticed after {noticed_s:.2f}s (bound {bound_s:g}s)")
    assert noticed_s <= bound_s, f"noticed after {noticed_s:.2f}s, bound {bound_s}s"
    # The server's delete marker on expiry, not a poll and not the worker's own goodbye.
    assert "worker gone worker_id=doomed reason=PURGE" in caplog.text
    assert left == []


async def test_a_worker_told_to_beat_slower_than_the_bucket_forgets_beats_fast_enough(
    nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The orchestrator created the bucket for 1 s beats (a 3 s TTL); this worker was told 5 s.
    slow = TopologySettings(heartbeat_interval_s=5.0)
    caplog.set_level(logging.WARNING)
    async with (
        orchestrator_for(nats_url) as orch,
        running_worker(worker_settings(nats_url, worker_id="slow", topology=slow)),
    ):
        await poll_until(lambda: "slow" in orch.workers, what="first beat")
        first = orch.workers["slow"].sent_at
        # A second beat within one TTL, and the worker never dropped out in between.
        await poll_until(lambda: orch.workers["slow"].sent_at > first, timeout_s=3, what="beat")
    assert "heartbeat every 1s, not 5s" in caplog.text
    assert "worker gone worker_id=slow reason=PURGE" not in caplog.text
