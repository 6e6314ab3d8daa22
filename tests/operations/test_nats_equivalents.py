"""Each `nats` line in docs/operations.md, as the JetStream API call it makes, against d8's figures.

The `nats` CLI cannot be installed on our build machines, so every documented line is
matched to a pattern here and `test_the_documented_api_calls_agree_with_d8_status` makes
the same API call and compares its answer with what `d8 status` shows. A new `nats` line in
the page fails `test_every_nats_line_in_operations_md_is_known` until it gets a check.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace

import anyio
import nats
import pytest

from mesh.contract import Task, decode_heartbeat
from mesh.results import DeadLetter
from mesh.topology import DEAD_STREAM, TASKS_STREAM, WORKERS_BUCKET, TopologySettings
from orchestrator.status import StatusCollector, StatusSnapshot
from tests.helpers import ROOT, orchestrator_for, poll_until, running_worker, worker_settings
from workers.backends import BackendSettings

pytestmark = pytest.mark.anyio

DOCUMENT = ROOT / "docs" / "operations.md"
WORKER_ID = "pi1-ollama-812"
CONSUMER = "chat-deepseek-coder-6-7b"

#: CLI pattern -> the JetStream API call it makes (natscli source).
KNOWN = {
    r"nats kv ls workers": "ordered consumer on $KV.workers.>, last per subject",
    r"nats kv get workers \S+": "$JS.API.DIRECT.GET.KV_workers.$KV.workers.<key>",
    r"nats kv watch workers": "ordered consumer on $KV.workers.>",
    r"nats kv info workers": "$JS.API.STREAM.INFO.KV_workers",
    r"nats consumer ls TASKS": "$JS.API.CONSUMER.NAMES.TASKS, then CONSUMER.LIST.TASKS",
    r"nats consumer report TASKS": "$JS.API.CONSUMER.LIST.TASKS",
    r"nats consumer info TASKS \S+": "$JS.API.CONSUMER.INFO.TASKS.<consumer>",
    r"nats stream info TASKS": "$JS.API.STREAM.INFO.TASKS",
    r"nats stream subjects (TASKS|DEAD)": "$JS.API.STREAM.INFO.<stream> with subjects_filter",
    r"nats stream view DEAD": "$JS.API.DIRECT.GET.DEAD by sequence",
    r"nats stream get DEAD \d+": "$JS.API.STREAM.MSG.GET.DEAD",
}


def _documented_lines() -> list[str]:
    lines = []
    for line in DOCUMENT.read_text().splitlines():
        pattern = r"(?:^|`)(nats (?:kv|stream|consumer|sub|pub|req) [^`#&]+)"
        lines += [found.group(1).strip() for found in re.finditer(pattern, line.strip())]
    return lines


def test_every_nats_line_in_operations_md_is_known() -> None:
    lines = _documented_lines()
    assert len(lines) >= len(KNOWN), lines
    unknown = [line for line in lines if not any(re.fullmatch(p, line) for p in KNOWN)]
    assert not unknown, f"add a pattern and a check for: {unknown}"
    unused = [p for p in KNOWN if not any(re.fullmatch(p, line) for line in lines)]
    assert not unused, f"patterns no longer documented: {unused}"


async def test_the_documented_api_calls_agree_with_d8_status(nats_url: str) -> None:
    topology = TopologySettings(heartbeat_interval_s=1.0)
    settings = worker_settings(nats_url, worker_id=WORKER_ID, concurrency=1)
    settings = replace(settings, backend_settings=BackendSettings(models=("deepseek-coder:6.7b",)))
    async with orchestrator_for(nats_url, topology=topology) as orch, running_worker(settings):
        await poll_until(lambda: WORKER_ID in orch.workers, what="worker")
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            await js.publish("tasks.chat.any", b"[1, 2", headers={"Nats-Msg-Id": "broken"})
            await poll_until(lambda: _count(js, DEAD_STREAM, 1), what="a dead letter")
            slow = {"echo": {"sleep_s": 2}}
            model = "deepseek-coder:6.7b"
            await orch.submit_many(
                Task(id=f"s-{i}", prompt="x", model=model, metadata=slow) for i in range(3)
            )
            await poll_until(lambda: _count(js, TASKS_STREAM, 3), what="tasks stored")
            await poll_until(lambda: _busy(js), what="one task running, two waiting")

            snapshot = await StatusCollector(js).collect()
            await _check_workers(js, snapshot)
            await _check_queues(nc, snapshot)
            await _check_dead_letters(js, snapshot)
        finally:
            await nc.close()


async def _check_workers(js: nats.js.JetStreamContext, snapshot: StatusSnapshot) -> None:
    kv = await js.key_value(WORKERS_BUCKET)
    # nats kv ls workers
    assert sorted(await kv.keys()) == [w.worker_id for w in snapshot.workers] == [WORKER_ID]
    # nats kv get workers pi1-ollama-812
    heartbeat = decode_heartbeat((await kv.get(WORKER_ID)).value or b"")
    assert heartbeat.capabilities == snapshot.workers[0].capabilities
    # nats kv watch workers: the snapshot first, then live changes
    watcher = await kv.watchall()
    with anyio.fail_after(5):
        first = await watcher.updates(timeout=5)
    await watcher.stop()
    assert first is not None and first.key == WORKER_ID
    # nats kv info workers: TTL of three intervals, and delete markers on expiry
    config = (await js.stream_info(f"KV_{WORKERS_BUCKET}")).config
    assert config.max_age == pytest.approx(3.0)
    assert config.subject_delete_marker_ttl == pytest.approx(1.0)


async def _check_queues(nc: nats.NATS, snapshot: StatusSnapshot) -> None:
    js = nc.jetstream()
    queues = {q.consumer: q for q in snapshot.queues}
    # nats consumer ls TASKS ; nats consumer report TASKS
    names = await nc.request(f"$JS.API.CONSUMER.NAMES.{TASKS_STREAM}", b"{}")
    assert sorted(json.loads(names.data)["consumers"]) == ["chat-any", CONSUMER]
    listed = await js.consumers_info(TASKS_STREAM)
    assert sorted(c.name for c in listed) == sorted(queues) == ["chat-any", CONSUMER]
    for info in listed:
        figures = queues[info.name]
        assert (figures.pending, figures.in_flight, figures.redelivered) == (
            info.num_pending,
            info.num_ack_pending,
            info.num_redelivered,
        )
    # nats consumer info TASKS chat-deepseek-coder-6-7b
    info = await js.consumer_info(TASKS_STREAM, CONSUMER)
    assert (info.num_pending, info.num_ack_pending) == (
        queues[CONSUMER].pending,
        queues[CONSUMER].in_flight,
    )
    assert (queues[CONSUMER].pending, queues[CONSUMER].in_flight) == (2, 1)
    # nats stream info TASKS ; nats stream subjects TASKS
    assert (await js.stream_info(TASKS_STREAM)).state.messages == snapshot.tasks_stored == 3
    subjects = (await js.stream_info(TASKS_STREAM, subjects_filter=">")).state.subjects or {}
    assert subjects == {"tasks.chat.deepseek-coder-6-7b": 3}


async def _check_dead_letters(js: nats.js.JetStreamContext, snapshot: StatusSnapshot) -> None:
    # nats stream subjects DEAD
    dead = (await js.stream_info(DEAD_STREAM, subjects_filter=">")).state
    assert dead.subjects == {"dead.chat.any": 1}
    assert {q.capability: q.dead for q in snapshot.queues} == {
        "chat/any": 1,
        "chat/deepseek-coder-6-7b": 0,
    }
    # nats stream view DEAD: direct gets from the first sequence
    viewed = [
        await js.get_msg(DEAD_STREAM, seq, direct=True)
        for seq in range(dead.first_seq, dead.last_seq + 1)
    ]
    assert [m.headers[DeadLetter.TASK_ID] for m in viewed if m.headers] == ["broken"]
    # nats stream get DEAD 1
    one = await js.get_msg(DEAD_STREAM, dead.last_seq)
    failure = snapshot.recent_failures[0]
    assert one.headers is not None
    assert (one.headers[DeadLetter.REASON], one.headers[DeadLetter.ERROR_TYPE]) == (
        failure.reason,
        failure.error_type,
    )
    assert failure.task_id == "broken" and failure.seq == dead.last_seq


async def _count(js: nats.js.JetStreamContext, stream: str, count: int) -> bool:
    return bool((await js.stream_info(stream)).state.messages == count)


async def _busy(js: nats.js.JetStreamContext) -> bool:
    info = await js.consumer_info(TASKS_STREAM, CONSUMER)
    return bool((info.num_ack_pending, info.num_pending) == (1, 2))
