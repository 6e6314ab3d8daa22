"""Declaring the topology: idempotent, updated in place, and what `nats` CLI users see."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import nats
import nats.errors
import nats.js
import pytest
from nats.js.api import RetentionPolicy, StorageType

from mesh.cluster import LocalCluster
from mesh.topology import (
    DEAD_STREAM,
    RESULTS_BUCKET,
    TASKS_STREAM,
    WORKERS_BUCKET,
    Capability,
    TopologySettings,
    declare_capability,
    declare_topology,
)
from tests.helpers import poll_until

if TYPE_CHECKING:
    from pathlib import Path


async def test_declaring_twice_is_a_no_op(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    try:
        settings = TopologySettings()
        await declare_topology(js, settings)
        await declare_capability(js, Capability("chat", "m"), settings, update=True)
        before = await js.stream_info(TASKS_STREAM)
        consumer_before = await js.consumer_info(TASKS_STREAM, "chat-m")

        await declare_topology(js, settings)
        await declare_capability(js, Capability("chat", "m"), settings, update=True)

        after = await js.stream_info(TASKS_STREAM)
        assert after.config == before.config
        assert after.created == before.created
        assert (await js.consumer_info(TASKS_STREAM, "chat-m")).config == consumer_before.config
    finally:
        await nc.close()


async def test_topology_matches_the_documented_shape(nats_url: str) -> None:
    # `nats stream info TASKS`, `nats stream info DEAD`, `nats kv info results|workers`
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    try:
        await declare_topology(js, TopologySettings(heartbeat_interval_s=2.0))
        tasks = (await js.stream_info(TASKS_STREAM)).config
        assert tasks.subjects == ["tasks.>"]
        assert tasks.retention == RetentionPolicy.WORK_QUEUE
        assert tasks.storage == StorageType.FILE
        assert tasks.duplicate_window == pytest.approx(120)
        assert tasks.allow_direct
        assert (await js.stream_info(DEAD_STREAM)).config.subjects == ["dead.>"]
        results = await (await js.key_value(RESULTS_BUCKET)).status()
        assert results.ttl == pytest.approx(86_400)
        workers = await js.stream_info(f"KV_{WORKERS_BUCKET}")
        assert workers.config.max_age == pytest.approx(6.0)
        assert workers.config.subject_delete_marker_ttl == pytest.approx(2.0)
        # `nats consumer ls TASKS`
        await declare_capability(
            js, Capability.for_model("deepseek-coder:6.7b"), TopologySettings(), update=True
        )
        names = [c.name for c in await js.consumers_info(TASKS_STREAM)]
        assert names == ["chat-deepseek-coder-6-7b"]
    finally:
        await nc.close()


async def test_changed_settings_update_streams_and_consumers_in_place(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    try:
        await declare_topology(js, TopologySettings())
        await declare_capability(js, Capability("chat", "m"), TopologySettings(), update=True)
        await js.publish("tasks.chat.m", b"{}")

        changed = TopologySettings(duplicate_window_s=60, ack_wait_s=90, max_deliver=7)
        await declare_topology(js, changed)
        await declare_capability(js, Capability("chat", "m"), changed, update=True)

        info = await js.stream_info(TASKS_STREAM)
        assert info.config.duplicate_window == pytest.approx(60)
        assert info.state.messages == 1, "updating must not lose queued tasks"
        consumer = (await js.consumer_info(TASKS_STREAM, "chat-m")).config
        assert (consumer.ack_wait, consumer.max_deliver) == (pytest.approx(90), 7)
    finally:
        await nc.close()


async def test_changed_settings_update_buckets_in_place(
    nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    try:
        await declare_topology(js, TopologySettings())
        kv = await js.key_value(RESULTS_BUCKET)
        await kv.put("kept", b"{}")
        with caplog.at_level(logging.INFO, logger="mesh.topology"):
            await declare_topology(js, TopologySettings())
        assert "updated" not in caplog.text, "the same settings again change nothing"

        changed = TopologySettings(results_ttl_s=3600, heartbeat_interval_s=2.0)
        await declare_topology(js, changed)

        results = (await js.stream_info(f"KV_{RESULTS_BUCKET}")).config
        workers = (await js.stream_info(f"KV_{WORKERS_BUCKET}")).config
        assert results.max_age == pytest.approx(3600)
        assert workers.max_age == pytest.approx(6.0)
        assert workers.subject_delete_marker_ttl == pytest.approx(2.0)
        assert (await kv.get("kept")).value == b"{}", "updating must not lose results"
    finally:
        await nc.close()


async def test_a_worker_never_overwrites_the_owners_consumer_settings(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    try:
        await declare_topology(js, TopologySettings())
        await declare_capability(
            js, Capability("chat", "m"), TopologySettings(ack_wait_s=120), update=True
        )
        config = await declare_capability(
            js, Capability("chat", "m"), TopologySettings(ack_wait_s=5), update=False
        )
        assert config.ack_wait == pytest.approx(120)
    finally:
        await nc.close()


async def test_a_changed_replica_count_reaches_streams_and_buckets(tmp_path: Path) -> None:
    with LocalCluster(tmp_path / "cluster") as cluster:
        nc = await nats.connect(servers=cluster.urls)
        try:
            js = nc.jetstream(timeout=10)
            await poll_until(lambda: _answers(js), timeout_s=30, what="a meta leader")
            await declare_topology(js, TopologySettings(replicas=1))
            await declare_topology(js, TopologySettings(replicas=3))
            names = [TASKS_STREAM, DEAD_STREAM, f"KV_{RESULTS_BUCKET}", f"KV_{WORKERS_BUCKET}"]
            replicas = [(await js.stream_info(n)).config.num_replicas for n in names]
        finally:
            await nc.close()
    assert replicas == [3, 3, 3, 3]


async def _answers(js: nats.js.JetStreamContext) -> bool:
    try:
        await js.account_info()
    except nats.errors.Error:
        return False
    return True
