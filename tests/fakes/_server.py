"""What every fake provider shares: scripted replies, a call log, and serving on loopback."""

from __future__ import annotations

import contextlib
import socket
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import anyio
import uvicorn

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

    from starlette.applications import Starlette

__all__ = [
    "Call",
    "FakeProvider",
    "Reply",
    "bad_request",
    "blocked",
    "empty",
    "hang",
    "no_quota",
    "ok",
    "rate_limited",
    "server_error",
    "serving",
]

ReplyKind = Literal[
    "ok", "rate_limited", "server_error", "hang", "blocked", "empty", "bad_request", "no_quota"
]


@dataclass(frozen=True, slots=True)
class Reply:
    """One scripted answer to one call."""

    kind: ReplyKind
    status: int = 200
    retry_after_s: float | None = None
    text: str | None = None


def ok(text: str | None = None) -> Reply:
    return Reply("ok", text=text)


def rate_limited(retry_after_s: float | None = None) -> Reply:
    """A 429; with `retry_after_s` the provider says how long to wait, in its own way."""
    return Reply("rate_limited", status=429, retry_after_s=retry_after_s)


def server_error(status: int = 500) -> Reply:
    return Reply("server_error", status=status)


def hang() -> Reply:
    """Accept the call and never answer (until the fake shuts down)."""
    return Reply("hang")


def blocked() -> Reply:
    """The provider's way of refusing an answer (safety block, content filter)."""
    return Reply("blocked")


def empty() -> Reply:
    """An answer with nothing in it (no candidates, no choices, or empty text)."""
    return Reply("empty")


def no_quota() -> Reply:
    """A 429 that waiting does not fix: the account is out of credit (OpenAI-style servers)."""
    return Reply("no_quota", status=429)


def bad_request() -> Reply:
    """A 400 the provider sends for a request it will never accept (context too long)."""
    return Reply("bad_request", status=400)


@dataclass(frozen=True, slots=True)
class Call:
    """One generation request as the fake received it."""

    path: str
    model: str
    prompt: str
    stream: bool
    at: float
    body: dict[str, Any]
    headers: dict[str, str]


@dataclass
class FakeProvider:
    """Scripted replies per prompt, a log of every call, and the key and models it accepts."""

    api_key: str | None = "test-key"
    models: set[str] = field(default_factory=lambda: {"fake-model"})
    calls: list[Call] = field(default_factory=list)
    url: str = ""
    _plans: dict[str, list[Reply]] = field(default_factory=dict)
    _closing: anyio.Event = field(default_factory=anyio.Event)

    def plan(self, prompt: str, *replies: Reply) -> None:
        """Answer the next calls for `prompt` with `replies`, in order; then plain `ok`."""
        self._plans.setdefault(prompt, []).extend(replies)

    def next_reply(self, prompt: str) -> Reply:
        plan = self._plans.get(prompt)
        return plan.pop(0) if plan else ok()

    def record(
        self, path: str, model: str, prompt: str, stream: bool, body: dict[str, Any], headers: Any
    ) -> None:
        self.calls.append(
            Call(path, model, prompt, stream, time.monotonic(), body, dict(headers.items()))
        )

    def calls_for(self, prompt: str) -> list[Call]:
        return [call for call in self.calls if call.prompt == prompt]

    @staticmethod
    def answer(prompt: str, reply: Reply) -> str:
        return reply.text if reply.text is not None else f"fake answer to {prompt}"

    @staticmethod
    def pieces(text: str) -> Iterator[str]:
        """The answer split the way a model streams it: word by word, spaces leading."""
        for index, word in enumerate(text.split(" ")):
            yield word if index == 0 else " " + word

    async def wait_closing(self) -> None:
        """Block a `hang` reply until the fake shuts down."""
        await self._closing.wait()

    def app(self) -> Starlette:
        raise NotImplementedError


class _InLoopServer(uvicorn.Server):
    """uvicorn inside the test's event loop, leaving the process's signal handlers alone."""

    def capture_signals(self) -> Any:
        return contextlib.nullcontext()


@asynccontextmanager
async def serving(fake: FakeProvider) -> AsyncIterator[FakeProvider]:
    """Serve `fake` on a random loopback port until the block ends; `fake.url` is its address."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        fake.app(), log_level="warning", lifespan="off", timeout_graceful_shutdown=1
    )
    server = _InLoopServer(config)
    fake.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    async with anyio.create_task_group() as group:
        group.start_soon(server.serve, [sock])
        with anyio.fail_after(5):
            # uvicorn signals readiness only through this flag.
            while not server.started:  # noqa: ASYNC110 - uvicorn has no readiness event
                await anyio.sleep(0.005)
        try:
            yield fake
        finally:
            fake._closing.set()
            server.should_exit = True
