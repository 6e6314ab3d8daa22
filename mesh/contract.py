"""The wire contract: every message that crosses the mesh, as msgspec structs.

Schema policy, pinned by ``tests/test_contract.py``:

- ``Task`` rejects unknown fields. A task is written by a client we do not control, and a
  misspelt option (``max_token``) silently ignored would run a different task than the one
  the caller meant. New optional fields may be added; old workers then dead-letter tasks
  that use them, with a reason that names the field.
- ``Result`` and ``Heartbeat`` ignore unknown fields, so a newer worker can add facts that an
  older orchestrator or client does not know yet.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

import msgspec

__all__ = [
    "TASK_ID_PATTERN",
    "ErrorInfo",
    "Heartbeat",
    "Message",
    "Options",
    "Result",
    "Status",
    "Task",
    "Timings",
    "Usage",
    "decode_heartbeat",
    "decode_result",
    "decode_task",
    "encode",
    "is_valid_task_id",
    "json_schemas",
]

# Subject-safe and a valid KV key: no '.', '*', '>' or whitespace, so an id is one token in
# `results.<id>`-style subjects and a plain key in the `results` bucket.
TASK_ID_PATTERN = r"^[A-Za-z0-9_-]{1,128}$"
_TASK_ID_RE = re.compile(TASK_ID_PATTERN)

TaskId = Annotated[str, msgspec.Meta(pattern=TASK_ID_PATTERN, description="Client-chosen id.")]
Status = Literal["ok", "error", "expired", "dead"]
# A model name must keep something once mapped to a subject token (`mesh.topology`).
ModelName = Annotated[
    str,
    msgspec.Meta(
        pattern=r"[A-Za-z0-9_]",
        max_length=256,
        description="A model name with at least one ASCII letter, digit or `_`.",
    ),
]
# Only an inbox may receive a copy of a result: a worker publishing to any subject a task
# names could overwrite another task's result or put junk into TASKS.
REPLY_SUBJECT_PATTERN = r"^_INBOX[A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)+$"
ReplySubject = Annotated[
    str,
    msgspec.Meta(
        pattern=REPLY_SUBJECT_PATTERN,
        max_length=256,
        description="An inbox subject (`_INBOX.` or a custom `_INBOX_<name>.` prefix).",
    ),
]


class Message(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One chat message."""

    role: Literal["system", "user", "assistant"]
    content: Annotated[str, msgspec.Meta(max_length=1_000_000)]


class Options(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Generation options; a backend maps each to its provider's name for it."""

    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] | None = None
    stop: Annotated[list[str], msgspec.Meta(max_length=16)] | None = None
    seed: int | None = None


class Task(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A unit of LLM work, published by a client to `tasks.<kind>.<model-token>`.

    Exactly one of ``prompt`` and ``messages`` is given. ``deadline`` is absolute (Unix
    seconds); ``timeout_s`` counts from the moment the task was stored in the stream. When
    both are given the earlier one wins.
    """

    id: TaskId
    prompt: str | None = None
    messages: Annotated[list[Message], msgspec.Meta(max_length=1000)] | None = None
    system: str | None = None
    model: ModelName | None = None
    options: Options = Options()
    deadline: float | None = None
    timeout_s: Annotated[float, msgspec.Meta(gt=0)] | None = None
    stream: bool = False
    reply_to: ReplySubject | None = None
    metadata: dict[str, Any] = {}

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` and `messages`")
        if self.messages is not None and not self.messages:
            raise ValueError("`messages` is empty")

    def chat_messages(self) -> list[Message]:
        """The input as chat messages, with the system prompt first when there is one."""
        messages = [Message(role="system", content=self.system)] if self.system else []
        if self.messages is not None:
            messages.extend(self.messages)
        else:
            messages.append(Message(role="user", content=self.prompt or ""))
        return messages


class Usage(msgspec.Struct, frozen=True, kw_only=True):
    """Token accounting as the backend reports it."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_ms: float | None = None
    tokens_per_s: float | None = None


class Timings(msgspec.Struct, frozen=True, kw_only=True):
    """Where a task's time went, in milliseconds."""

    queued_ms: float = 0.0
    run_ms: float = 0.0
    total_ms: float = 0.0


class ErrorInfo(msgspec.Struct, frozen=True, kw_only=True):
    """Why a task did not end `ok`: a stable type name and a human message."""

    type: str
    message: str


class Result(msgspec.Struct, frozen=True, kw_only=True):
    """The outcome of one task, stored once under its id in the `results` bucket."""

    id: str
    status: Status
    output: str = ""
    usage: Usage = Usage()
    model: str | None = None
    backend: str | None = None
    worker_id: str | None = None
    attempt: int = 1
    timings: Timings = Timings()
    error: ErrorInfo | None = None
    metadata: dict[str, Any] = {}
    finished_at: float = 0.0
    chunks: int = 0
    #: The queue (`kind/token`) the task ran from; differs from the asked-for model's when
    #: the orchestrator routed it along a fallback chain.
    capability: str | None = None


class Heartbeat(msgspec.Struct, frozen=True, kw_only=True):
    """What a live worker says about itself every heartbeat interval."""

    worker_id: str
    host: str
    arch: str
    capabilities: list[str]
    backend: str
    models: list[str]
    concurrency: int
    in_flight: int
    started_at: float
    version: str
    rss_mb: float
    completed: int = 0
    failed: int = 0
    sent_at: float = 0.0
    #: One-minute load average of the host.
    load_1m: float | None = None
    #: SoC temperature in degrees Celsius, where the thermal zone is readable.
    soc_temp_c: float | None = None
    #: `vcgencmd get_throttled` bits on a Raspberry Pi (0: all fine).
    throttled: int | None = None


_encoder = msgspec.json.Encoder()
_task_decoder = msgspec.json.Decoder(Task)
_result_decoder = msgspec.json.Decoder(Result)
_heartbeat_decoder = msgspec.json.Decoder(Heartbeat)


def encode(message: Task | Result | Heartbeat) -> bytes:
    """Encode any contract struct as compact JSON."""
    return _encoder.encode(message)


def decode_task(data: bytes) -> Task:
    """Decode and validate a task.

    Raises:
        msgspec.ValidationError: the JSON is well formed but breaks the contract; the message
            names the offending field.
        msgspec.DecodeError: the bytes are not JSON (or not UTF-8).
    """
    return _task_decoder.decode(data)


def decode_result(data: bytes) -> Result:
    """Decode a result written by a worker or the orchestrator."""
    return _result_decoder.decode(data)


def decode_heartbeat(data: bytes) -> Heartbeat:
    """Decode a worker heartbeat."""
    return _heartbeat_decoder.decode(data)


def is_valid_task_id(value: object) -> bool:
    """Whether `value` can serve as a task id (and so as a subject token and KV key)."""
    return isinstance(value, str) and _TASK_ID_RE.match(value) is not None


def json_schemas() -> dict[str, Any]:
    """JSON Schemas for Task, Result and Heartbeat, generated from the structs."""
    (task, result, heartbeat), components = msgspec.json.schema_components(
        [Task, Result, Heartbeat], ref_template="#/$defs/{name}"
    )
    # What `Task.__post_init__` checks, which msgspec cannot express: exactly one input.
    components["Task"]["oneOf"] = [
        {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
        {"required": ["messages"], "properties": {"messages": {"type": "array", "minItems": 1}}},
    ]
    return {
        name: {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            **ref,
            "$defs": components,
        }
        for name, ref in (("Task", task), ("Result", result), ("Heartbeat", heartbeat))
    }


def main() -> None:
    """Print the generated schemas (`python -m mesh.contract > docs/schemas.json`)."""
    print(json.dumps(json_schemas(), indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
