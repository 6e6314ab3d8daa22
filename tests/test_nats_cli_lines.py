"""Every `nats ...` line in the docs, and the JetStream API call it stands for, checked live.

The `nats` CLI cannot be installed on our build machines (it needs Go), so each documented
command is matched to a pattern below, and `test_documented_commands_work` makes the same
API call the CLI makes and checks the answer. A new `nats` line in the docs fails
`test_every_documented_nats_line_is_known` until it gets a pattern and a check here.
"""

from __future__ import annotations

import json
import re

import anyio
import nats
import pytest

from mesh.topology import DEAD_STREAM, RESULTS_BUCKET, TASKS_STREAM, WORKERS_BUCKET
from tests.helpers import ROOT, orchestrator_for, poll_until, running_worker, worker_settings

pytestmark = pytest.mark.anyio

DOCUMENTS = ["README.md", "docs/protocol.md", "docs/reliability.md", "docs/backends.md"]

#: CLI pattern -> the API call it makes (checked in test_documented_commands_work).
KNOWN = {
    r"nats sub (_INBOX\.\S+|'?chunks\.\S+|'?results\.\S+)": "core SUB on the subject",
    r"nats pub tasks\.chat\.\S+ '.+' -H Nats-Msg-Id:\S+": "core PUB with header",
    r"nats req tasks\.chat\.\S+ '.+' -H Nats-Msg-Id:\S+": "request; the reply is the PubAck",
    r"nats kv get (results|workers) \S+": "$JS.API.DIRECT.GET.KV_<bucket>.$KV.<bucket>.<key>",
    r"nats kv watch (results|workers)( \S+)?": "ordered consumer on $KV.<bucket>.<key>",
    r"nats kv ls (results|workers)": "ordered consumer, last per subject, headers only",
    r"nats kv del results \S+": "PUB $KV.results.<key> with header KV-Operation: DEL",
    r"nats stream info (TASKS|DEAD)": "$JS.API.STREAM.INFO.<stream>",
    r"nats stream get (TASKS|DEAD) \d+": "$JS.API.STREAM.MSG.GET.<stream>",
    r"nats stream view (TASKS|DEAD)": "direct gets on the stream",
    r"nats consumer ls TASKS": "$JS.API.CONSUMER.NAMES.TASKS, then CONSUMER.LIST.TASKS",
    r"nats consumer info TASKS \S+": "$JS.API.CONSUMER.INFO.TASKS.<consumer>",
}


def _documented_lines() -> list[str]:
    lines = []
    for name in DOCUMENTS:
        for line in (ROOT / name).read_text().splitlines():
            lines += [
                found.group(1).strip()
                for found in re.finditer(
                    r"(?:^|`)(nats (?:sub|pub|req|kv|stream|consumer) [^`#&]+)", line.strip()
                )
            ]
    return lines


def test_every_documented_nats_line_is_known() -> None:
    lines = _documented_lines()
    assert lines, "the docs should show the nats CLI"
    unknown = [line for line in lines if not any(re.fullmatch(p, line) for p in KNOWN)]
    assert not unknown, f"add a pattern and a check for: {unknown}"


async def test_documented_commands_work(nats_url: str) -> None:
    async with (
        orchestrator_for(nats_url),
        running_worker(worker_settings(nats_url)) as worker,
    ):
        nc = await nats.connect(nats_url)
        try:
            await _check_submit_and_read(nc)
            await _check_queue_views(nc, worker.worker_id)
        finally:
            await nc.close()


async def _check_submit_and_read(nc: nats.NATS) -> None:
    js = nc.jetstream()
    # nats sub _INBOX.me.t1 & ; nats pub tasks.chat.any '{...reply_to...}' -H Nats-Msg-Id:t1
    inbox = await nc.subscribe("_INBOX.me.t1", max_msgs=1)
    # nats sub 'results.*': every result, once the bucket has stored it
    stored = await nc.subscribe("results.*", max_msgs=1)
    body = {"id": "t1", "prompt": "Say hi", "reply_to": "_INBOX.me.t1"}
    await nc.publish("tasks.chat.any", json.dumps(body).encode(), headers={"Nats-Msg-Id": "t1"})
    pushed = json.loads((await inbox.next_msg(timeout=10)).data)
    assert (pushed["id"], pushed["status"]) == ("t1", "ok")
    republished = await stored.next_msg(timeout=10)
    assert republished.subject == "results.t1"
    assert json.loads(republished.data) == pushed

    # nats req tasks.chat.any '{...}' -H Nats-Msg-Id:t2 -> {"stream":"TASKS","seq":N}
    request = json.dumps({"id": "t2", "prompt": "Say hi"}).encode()
    answer = json.loads(
        (await nc.request("tasks.chat.any", request, timeout=5, headers={"Nats-Msg-Id": "t2"})).data
    )
    assert answer["stream"] == TASKS_STREAM and answer["seq"] >= 2
    again = json.loads(
        (await nc.request("tasks.chat.any", request, timeout=5, headers={"Nats-Msg-Id": "t2"})).data
    )
    assert again.get("duplicate") is True

    # nats kv get results t1 ; nats kv watch results t2
    kv = await js.key_value(RESULTS_BUCKET)
    assert json.loads((await kv.get("t1")).value)["output"] == "echo: Say hi"
    watcher = await kv.watch("t2")
    with anyio.fail_after(10):
        async for entry in watcher:
            if entry is not None and entry.value:
                assert json.loads(entry.value)["id"] == "t2"
                break
    await watcher.stop()

    # nats sub chunks.t3, then a streaming task
    chunks = await nc.subscribe("chunks.t3")
    stream_task = json.dumps({"id": "t3", "prompt": "one two three", "stream": True}).encode()
    await js.publish("tasks.chat.any", stream_task, headers={"Nats-Msg-Id": "t3"})
    pieces = [(await chunks.next_msg(timeout=10)).data.decode() for _ in range(4)]
    assert "".join(pieces) == "echo: one two three"


async def _check_queue_views(nc: nats.NATS, worker_id: str) -> None:
    js = nc.jetstream()
    # nats stream info TASKS: empty once every task is acked
    await poll_until(lambda: _messages(js, TASKS_STREAM, 0), what="TASKS to drain")
    # nats consumer ls TASKS ; nats consumer info TASKS chat-any
    names = json.loads((await nc.request(f"$JS.API.CONSUMER.NAMES.{TASKS_STREAM}", b"{}")).data)
    assert names["consumers"] == ["chat-any", "chat-echo"]
    assert [c.name for c in await js.consumers_info(TASKS_STREAM)] == ["chat-any", "chat-echo"]
    assert (await js.consumer_info(TASKS_STREAM, "chat-any")).num_ack_pending == 0
    # nats kv ls results ; nats kv ls workers
    results = await js.key_value(RESULTS_BUCKET)
    assert sorted(await results.keys()) == ["t1", "t2", "t3"]
    # nats kv del results t3: a delete marker, and the key is gone from `kv ls`
    await js.publish(f"$KV.{RESULTS_BUCKET}.t3", b"", headers={"KV-Operation": "DEL"})
    assert sorted(await results.keys()) == ["t1", "t2"]
    await poll_until(lambda: _has_key(js, worker_id), what="heartbeat key")
    # nats stream info DEAD ; nats stream get DEAD 1 ; nats stream view TASKS (direct gets)
    assert (await js.stream_info(DEAD_STREAM)).state.messages == 0
    await js.publish("tasks.chat.nobody-serves-this", b'{"id":"parked","prompt":"x"}')
    parked = await js.get_msg(TASKS_STREAM, subject="tasks.chat.nobody-serves-this", direct=True)
    assert json.loads(parked.data)["id"] == "parked"


async def _messages(js: object, stream: str, count: int) -> bool:
    return bool((await js.stream_info(stream)).state.messages == count)  # type: ignore[attr-defined]


async def _has_key(js: object, key: str) -> bool:
    kv = await js.key_value(WORKERS_BUCKET)  # type: ignore[attr-defined]
    return key in await kv.keys()
