"""Hostile input: refused at submit time where we see it, dead-lettered when sent raw."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from typing import TYPE_CHECKING

import msgspec
import nats
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.contract import Task, decode_task, encode
from mesh.errors import SubmitError
from mesh.results import DeadLetter
from mesh.topology import DEAD_STREAM, TASKS_STREAM
from tests.faults.helpers import fault_topology, start_worker
from tests.faults.ledger import read_ledger
from tests.helpers import ROOT, orchestrator_for, poll_until

if TYPE_CHECKING:
    from pathlib import Path

_NESTED = (
    b'{"id": "h-nested", "prompt": "x", "metadata": {"m": ' + b"[" * 50_000 + b"]" * 50_000 + b"}}"
)

#: (name, body, Nats-Msg-Id header or None, the id a result is stored under or None,
#: what the dead letter's reason says).
HOSTILE = [
    ("malformed json", b'{"id": "h-json", "prompt": ', "h-json", "h-json", "truncated"),
    ("wrong type", b'{"id": "h-type", "prompt": 42}', None, "h-type", "got `int` - at `$.prompt`"),
    (
        "unknown field",
        b'{"id": "h-field", "prompt": "x", "max_token": 5}',
        None,
        "h-field",
        "unknown field `max_token`",
    ),
    ("missing id", b'{"prompt": "who am I"}', None, None, "missing required field `id`"),
    ("deeply nested", _NESTED, "h-nested", "h-nested", "invalid task"),
    (
        "invalid utf-8",
        b'{"id": "h-utf8", "prompt": "\xff\xfe"}',
        "h-utf8",
        "h-utf8",
        "invalid task",
    ),
    ("unsafe id", b'{"id": "a.b >", "prompt": "x"}', None, None, "Expected `str` matching regex"),
    ("empty body", b"", None, None, "truncated"),
    ("not an object", b"[1, 2, 3]", None, None, "Expected `object`, got `array`"),
    (
        "both inputs",
        b'{"id": "h-both", "prompt": "x", "messages": [{"role": "user", "content": "y"}]}',
        None,
        "h-both",
        "exactly one of `prompt` and `messages`",
    ),
]


async def test_raw_hostile_tasks_become_dead_letters_and_the_worker_keeps_serving(
    nats_url: str, tmp_path: Path
) -> None:
    topology = fault_topology()
    async with orchestrator_for(nats_url, topology=topology) as orch:
        worker = await start_worker(orch, nats_url, "tough", tmp_path, topology)
        raw = await nats.connect(nats_url)
        try:
            js = raw.jetstream()
            for _, body, header_id, _, _ in HOSTILE:
                headers = {"Nats-Msg-Id": header_id} if header_id else None
                await js.publish("tasks.chat.any", body, headers=headers)
            dead = await poll_until(
                lambda: _count(orch, DEAD_STREAM, len(HOSTILE)),
                timeout_s=20,
                what="the dead letters",
            )
            letters = [
                await orch.js.get_msg(DEAD_STREAM, seq) for seq in range(1, len(HOSTILE) + 1)
            ]

            await orch.submit(Task(id="after-the-storm", prompt="still there?"))
            after = await orch.wait("after-the-storm", timeout_s=20)
            alive = worker.process.poll() is None
        finally:
            await raw.close()
            code = worker.stop()
        ids = [result_id for *_, result_id, _ in HOSTILE if result_id] + ["after-the-storm"]
        ledger = await read_ledger(orch.js, ids, [worker.log()])

    assert (alive, code) == (True, 0)
    assert after is not None and (after.status, after.worker_id) == ("ok", "tough")
    assert dead == len(HOSTILE)
    for (name, body, _, result_id, reason), letter in zip(HOSTILE, letters, strict=True):
        assert letter.headers is not None, name
        assert letter.data == (body or None), name
        assert reason in letter.headers[DeadLetter.REASON], (
            name,
            letter.headers[DeadLetter.REASON],
        )
        assert letter.headers.get(DeadLetter.TASK_ID) == result_id, name
        if result_id:
            error = ledger.results[result_id].error
            assert error is not None and error.type == "invalid_task", name
    ledger.check(dead_letters=len(HOSTILE))
    assert ledger.statuses["error"] == len(ids) - 1


async def _count(orch: object, stream: str, at_least: int) -> int | None:
    count: int = (await orch.js.stream_info(stream)).state.messages  # type: ignore[attr-defined]
    return count if count >= at_least else None


async def test_a_payload_over_max_payload_never_enters_the_stream(nats_url: str) -> None:
    # A raw client in any language: the server refuses the PUB line and drops the client.
    host, port = nats_url.removeprefix("nats://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        info = json.loads((await reader.readline()).split(b" ", 1)[1])
        size = info["max_payload"] + 1
        # The PUB line announces the size; the server answers before any payload is sent.
        writer.write(b'CONNECT {"verbose":false}\r\n' + f"PUB tasks.chat.any {size}\r\n".encode())
        await writer.drain()
        answer = await asyncio.wait_for(reader.readline(), timeout=10)
    finally:
        writer.close()
    async with orchestrator_for(nats_url) as orch:
        stored = (await orch.js.stream_info(TASKS_STREAM)).state.messages
    assert answer.startswith(b"-ERR 'Maximum Payload Violation'")
    assert stored == 0


async def test_the_orchestrator_refuses_what_no_worker_could_run(nats_url: str) -> None:
    async with orchestrator_for(nats_url) as orch:
        max_payload = orch.nc.max_payload
        with pytest.raises(
            SubmitError, match=r"task 'a\.b' breaks the task contract: Expected `str` matching"
        ):
            await orch.submit(Task(id="a.b", prompt="x"))
        with pytest.raises(
            SubmitError, match=f"over the server's max_payload of {max_payload} bytes"
        ):
            await orch.submit(Task(id="huge", prompt="x" * max_payload))
        with pytest.raises(SubmitError, match="breaks the task contract"):
            await orch.submit_many([Task(id="fine", prompt="x"), Task(id="no way", prompt="x")])
        stored = (await orch.js.stream_info(TASKS_STREAM)).state.messages
    assert stored == 0, "a refused batch must not be half submitted"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--id", "bad id", "hello"], "d8 submit: task 'bad id' breaks the task contract"),
        (["--file", "{huge}"], "bytes, over the server's max_payload of 1048576 bytes: shorten it"),
    ],
)
def test_the_cli_says_why_a_task_was_refused(
    nats_url: str, tmp_path: Path, args: list[str], message: str
) -> None:
    huge = tmp_path / "huge.jsonl"
    huge.write_bytes(encode(Task(id="huge", prompt="x" * 2_000_000)) + b"\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NATS_URL": nats_url}
    done = subprocess.run(
        [sys.executable, "-m", "mesh.cli", "submit", *[a.format(huge=huge) for a in args]],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert message in done.stderr


task_ids = st.text(max_size=12) | st.from_regex(r"[A-Za-z0-9_-]{1,12}", fullmatch=True)


@settings(max_examples=300, deadline=None)
@given(
    st.builds(
        Task,
        id=task_ids,
        prompt=st.text(max_size=40),
        model=st.none() | st.text(max_size=12),
        timeout_s=st.none() | st.floats(allow_nan=False, allow_infinity=False),
        metadata=st.dictionaries(
            st.text(max_size=6), st.integers() | st.text(max_size=6), max_size=3
        ),
    )
)
def test_a_task_the_orchestrator_accepts_is_the_task_a_worker_decodes(task: Task) -> None:
    # The submit-time check is `decode_task(encode(task))`: it passes exactly when a worker
    # will decode the same task, and otherwise says why with a validation error.
    try:
        decoded = decode_task(encode(task))
    except msgspec.ValidationError:
        return
    assert decoded == task
