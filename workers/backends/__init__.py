"""LLM backends behind one interface, imported only by the worker that uses them.

Adding a backend is one module with a class that satisfies `Backend`, plus one line in
`REGISTRY`.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Self

from mesh.errors import ConfigError

if TYPE_CHECKING:
    from types import TracebackType

    from mesh.contract import Task, Usage

__all__ = ["REGISTRY", "Backend", "BackendSettings", "Generation", "OnPiece", "load_backend"]

#: Called with each piece of output as it arrives, when a task streams.
OnPiece = Callable[[str], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Generation:
    """What a backend returns for one task."""

    text: str
    model: str
    usage: Usage


@dataclass(frozen=True, slots=True)
class BackendSettings:
    """Settings every backend understands; each reads its own extras from the environment."""

    models: tuple[str, ...] = ()
    base_url: str | None = None
    timeout_s: float = 600.0
    pull: bool = False
    #: Cloud backends: at most this many calls per minute (None: no limit).
    rpm: float | None = None


class Backend(Protocol):
    """One kind of LLM server. Setup and teardown go through `async with`."""

    name: str
    #: The models this backend serves; the first is used for tasks that name none.
    models: tuple[str, ...]
    #: How many tasks this backend runs at once unless the worker is told otherwise.
    default_concurrency: int
    #: Whether a call costs time or money: then the worker looks for a stored result before
    #: every attempt, so an id submitted again after the duplicate window is not paid twice.
    costly: bool

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None: ...

    async def generate(self, task: Task, model: str, on_piece: OnPiece | None) -> Generation:
        """Run one task on `model`; raise a `mesh.errors` class on failure."""
        ...


#: Backend name -> "module:Class", imported on first use so a worker loads one SDK only.
REGISTRY: dict[str, str] = {
    "echo": "workers.backends.echo:EchoBackend",
    "ollama": "workers.backends.ollama:OllamaBackend",
    "groq": "workers.backends.groq:GroqBackend",
    "gemini": "workers.backends.gemini:GeminiBackend",
    "openai": "workers.backends.openai_compat:OpenAIBackend",
}


def load_backend(name: str, settings: BackendSettings) -> Backend:
    """Build the backend called `name`."""
    try:
        target = REGISTRY[name]
    except KeyError:
        choices = ", ".join(sorted(REGISTRY))
        raise ConfigError(f"unknown backend {name!r}: choose one of {choices}") from None
    module_name, class_name = target.split(":")
    backend_class = getattr(importlib.import_module(module_name), class_name)
    backend: Backend = backend_class(settings)
    return backend
