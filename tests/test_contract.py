"""The wire contract: what decodes, what is refused and with which message, and the schemas."""

from __future__ import annotations

import json

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.contract import (
    Result,
    Task,
    decode_heartbeat,
    decode_result,
    decode_task,
    encode,
    json_schemas,
)
from mesh.topology import Capability, model_token, task_subject


def test_prompt_task_round_trips() -> None:
    task = Task(id="t-1", prompt="hi", model="deepseek-coder:6.7b", metadata={"k": [1, 2]})
    assert decode_task(encode(task)) == task


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"{", "truncated"),
        (b"\xff\xfe", "invalid"),
        (b'{"prompt": "x"}', "missing required field `id`"),
        (b'{"id": "a.b", "prompt": "x"}', r"Expected `str` matching regex"),
        (b'{"id": "a", "prompt": 3}', r"Expected `str \| null`, got `int` - at `\$.prompt`"),
        (
            b'{"id": "a", "prompt": "x", "max_token": 5}',
            "Object contains unknown field `max_token`",
        ),
        (b'{"id": "a"}', "give exactly one of `prompt` and `messages`"),
        (
            b'{"id": "a", "prompt": "x", "messages": [{"role": "user", "content": "y"}]}',
            "exactly one",
        ),
        (b'{"id": "a", "messages": []}', "`messages` is empty"),
        (
            b'{"id": "a", "messages": [{"role": "robot", "content": "y"}]}',
            r"at `\$.messages\[0\].role`",
        ),
        (b'{"id": "a", "prompt": "x", "options": {"temperature": 9}}', r"Expected `float` <= 2"),
        (b'{"id": "a", "prompt": "x", "timeout_s": 0}', r"Expected `float` > 0"),
        (b'{"id": "a", "prompt": "x", "reply_to": "$KV.results.b"}', r"at `\$.reply_to`"),
        (b'{"id": "a", "prompt": "x", "reply_to": "tasks.chat.any"}', r"at `\$.reply_to`"),
        (b'{"id": "a", "prompt": "x", "reply_to": "_INBOX.a b"}', r"at `\$.reply_to`"),
        # A model name that maps to no subject token (`mesh.topology.model_token`).
        (b'{"id": "a", "prompt": "x", "model": "..."}', r"matching regex .* at `\$.model`"),
        (b'{"id": "a", "prompt": "x", "model": ""}', r"matching regex .* at `\$.model`"),
    ],
)
def test_bad_tasks_are_refused_with_a_clear_message(payload: bytes, message: str) -> None:
    with pytest.raises(msgspec.DecodeError, match=message):
        decode_task(payload)


def test_deeply_nested_json_is_refused_not_crashing() -> None:
    nested = (
        b'{"id": "a", "prompt": "x", "metadata": {"m": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}"
    )
    with pytest.raises((msgspec.DecodeError, RecursionError)):
        decode_task(nested)


def test_result_and_heartbeat_ignore_unknown_fields() -> None:
    # Newer workers may add facts; older readers must keep working.
    result = json.loads(encode(Result(id="a", status="ok")))
    result["new_fact"] = 1
    assert decode_result(json.dumps(result).encode()).id == "a"
    heartbeat = {
        "worker_id": "w",
        "host": "h",
        "arch": "x",
        "capabilities": [],
        "backend": "echo",
        "models": [],
        "concurrency": 1,
        "in_flight": 0,
        "started_at": 0,
        "version": "0",
        "rss_mb": 1.0,
        "soc_temp_c": 50,
    }
    assert decode_heartbeat(json.dumps(heartbeat).encode()).worker_id == "w"


@pytest.mark.parametrize("subject", ["_INBOX.abc", "_INBOX.me.t1", "_INBOX_orchestrator.x.y"])
def test_inbox_reply_subjects_are_accepted(subject: str) -> None:
    assert Task(id="a", prompt="x", reply_to=subject).reply_to == subject


def test_chat_messages_put_the_system_prompt_first() -> None:
    task = Task(id="a", prompt="q", system="be brief")
    assert [(m.role, m.content) for m in task.chat_messages()] == [
        ("system", "be brief"),
        ("user", "q"),
    ]


@pytest.mark.parametrize(
    ("model", "token"),
    [
        ("deepseek-coder:6.7b", "deepseek-coder-6-7b"),
        ("DeepSeek-Coder:1.3B-instruct", "deepseek-coder-1-3b-instruct"),
        ("llama-3.1-8b-instant", "llama-3-1-8b-instant"),
        ("gemini-2.5-flash", "gemini-2-5-flash"),
        ("models/gemini x", "models-gemini-x"),
        (None, "any"),
    ],
)
def test_model_names_map_to_subject_tokens(model: str | None, token: str) -> None:
    assert model_token(model) == token
    assert task_subject(model) == f"tasks.chat.{token}"
    assert Capability.for_model(model).consumer == f"chat-{token}"


def test_a_model_name_without_letters_is_refused() -> None:
    with pytest.raises(ValueError, match="no letters or digits"):
        model_token(":::")


def test_json_schemas_are_generated_and_checked_in() -> None:
    schemas = json_schemas()
    assert set(schemas) == {"Task", "Result", "Heartbeat"}
    task = schemas["Task"]["$defs"]["Task"]
    assert task["additionalProperties"] is False
    assert task["required"] == ["id"]
    from tests.helpers import ROOT

    checked_in = json.loads((ROOT / "docs" / "schemas.json").read_text())
    assert checked_in == json.loads(json.dumps(schemas)), "run `d8 schema > docs/schemas.json`"


@pytest.mark.parametrize(
    "task",
    [
        {"id": "a", "prompt": "x"},
        {"id": "a", "prompt": "x", "messages": None},
        {"id": "a", "messages": [{"role": "user", "content": "y"}]},
        {"id": "a"},
        {"id": "a", "prompt": None},
        {"id": "a", "prompt": "x", "messages": [{"role": "user", "content": "y"}]},
        {"id": "a", "messages": []},
        {"id": "a", "prompt": "x", "model": "..."},
        {"id": "a", "prompt": "x", "model": "deepseek-coder:6.7b"},
    ],
)
def test_the_task_schema_accepts_what_workers_accept(task: dict[str, object]) -> None:
    import jsonschema

    schema = json_schemas()["Task"]
    try:
        decode_task(json.dumps(task).encode())
    except msgspec.ValidationError:
        decodes = False
    else:
        decodes = True
    assert jsonschema.Draft202012Validator(schema).is_valid(task) == decodes


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_decoding_arbitrary_bytes_either_works_or_raises_decode_error(data: bytes) -> None:
    try:
        task = decode_task(data)
    except msgspec.DecodeError:
        return
    assert decode_task(encode(task)) == task


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["id", "prompt", "messages", "model", "options", "metadata", "x"]),
        json_values,
    )
)
def test_decoding_arbitrary_json_objects_never_raises_anything_else(obj: dict[str, object]) -> None:
    try:
        decode_task(json.dumps(obj).encode())
    except msgspec.DecodeError:
        pass
