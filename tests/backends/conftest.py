"""A fake provider per backend, served on loopback, and worker settings pointing at it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest

from tests.fakes._server import FakeProvider, serving
from tests.fakes.gemini_api import FakeGemini
from tests.fakes.groq_api import FakeGroq
from tests.fakes.ollama_api import FakeOllama
from tests.fakes.openai_api import FakeOpenAI
from tests.helpers import worker_settings
from workers.backends import BackendSettings
from workers.execution import RetryPolicy

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from workers.runtime import WorkerSettings

MODEL = "fake-model"
KEY = "test-key"
# Every variable a backend reads, cleared so the machine's own settings cannot leak in.
PROVIDER_VARIABLES = (
    "GROQ_API_KEY",
    "GROQ_BASE_URL",
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "GEMINI_API_KEY",
    "GOOGLE_API_KEY",
    "GOOGLE_GEMINI_BASE_URL",
    "GOOGLE_GENAI_API_VERSION",
    "OLLAMA_HOST",
    "OLLAMA_API_KEY",
    "D8_OLLAMA_KEEP_ALIVE",
)
KEY_VARIABLE = {"groq": "GROQ_API_KEY", "openai": "OPENAI_API_KEY", "gemini": "GEMINI_API_KEY"}
FAKES: dict[str, tuple[type[FakeProvider], str]] = {
    "ollama": (FakeOllama, ""),
    "groq": (FakeGroq, ""),
    "openai": (FakeOpenAI, "/v1"),
    "gemini": (FakeGemini, ""),
}
BACKENDS = sorted(FAKES)
CLOUD_BACKENDS = sorted(KEY_VARIABLE)


@dataclass
class Provider:
    """One backend and the fake it talks to."""

    backend: str
    fake: FakeProvider

    @property
    def base_url(self) -> str:
        return self.fake.url + FAKES[self.backend][1]

    def settings(
        self, nats_url: str, *, timeout_s: float = 5.0, **overrides: Any
    ) -> WorkerSettings:
        """Worker settings for this backend: quick retries, the fake's address."""
        backend_settings = BackendSettings(
            models=(MODEL,), base_url=self.base_url, timeout_s=timeout_s
        )
        fields: dict[str, Any] = {
            "backend": self.backend,
            "backend_settings": backend_settings,
            "retry": RetryPolicy(base_delay_s=0.2, max_delay_s=1.0),
        }
        fields.update(overrides)
        return worker_settings(nats_url, **fields)

    def revoke_key(self) -> None:
        """Make the provider refuse the key the worker holds."""
        self.fake.api_key = "a-different-key"

    def restore_key(self) -> None:
        """Accept the worker's key again (Ollama: no key at all)."""
        self.fake.api_key = None if self.backend == "ollama" else KEY


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in PROVIDER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name in KEY_VARIABLE.values():
        monkeypatch.setenv(name, KEY)
    return monkeypatch


async def _provider(backend: str) -> AsyncIterator[Provider]:
    fake_class, _ = FAKES[backend]
    fake = (
        fake_class(models={MODEL})
        if backend == "ollama"
        else fake_class(api_key=KEY, models={MODEL})
    )
    async with serving(fake):
        yield Provider(backend, fake)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=CLOUD_BACKENDS)
def cloud_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def provider(backend: str, clean_env: pytest.MonkeyPatch) -> AsyncIterator[Provider]:
    """Each backend in turn, with its fake provider running."""
    async for item in _provider(backend):
        yield item


@pytest.fixture
async def cloud_provider(
    cloud_backend: str, clean_env: pytest.MonkeyPatch
) -> AsyncIterator[Provider]:
    """Each backend that needs an API key, with its fake provider running."""
    async for item in _provider(cloud_backend):
        yield item
