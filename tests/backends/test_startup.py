"""Start-up: keys, models and endpoints are checked before a worker serves, with fix-it messages."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest

from mesh.contract import Message, Task
from mesh.errors import ConfigError, WorkerFatalError
from tests.backends.conftest import BACKENDS, KEY, KEY_VARIABLE, MODEL, Provider
from tests.fakes._server import no_quota, serving
from tests.fakes.ollama_api import FakeOllama
from tests.helpers import ROOT
from workers.backends import BackendSettings, load_backend

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

pytestmark = pytest.mark.anyio

BASE_URL_VARIABLE = {
    "groq": "GROQ_BASE_URL",
    "openai": "OPENAI_BASE_URL",
    "gemini": "GOOGLE_GEMINI_BASE_URL",
    "ollama": "OLLAMA_HOST",
}
SDK_MODULE = {"groq": "groq", "openai": "openai", "gemini": "google.genai"}


@pytest.mark.parametrize("backend", sorted(KEY_VARIABLE))
def test_a_missing_key_names_the_variable_to_set(
    backend: str, clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.delenv(KEY_VARIABLE[backend])
    with pytest.raises(ConfigError, match=f"needs an API key: set .*{KEY_VARIABLE[backend]}"):
        load_backend(backend, BackendSettings(models=(MODEL,)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_missing_model_asks_for_one(backend: str, clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=rf"the {backend} backend needs a model: pass --model"):
        load_backend(backend, BackendSettings())


async def test_a_rejected_key_stops_start_up_without_showing_it(
    cloud_provider: Provider, caplog: pytest.LogCaptureFixture
) -> None:
    cloud_provider.revoke_key()
    caplog.set_level(logging.DEBUG)
    backend = load_backend(cloud_provider.backend, _settings(cloud_provider))
    with pytest.raises(ConfigError) as raised:
        async with backend:
            pass
    message = str(raised.value)
    assert "401" in message or "credentials" in message
    assert KEY not in message
    assert KEY not in caplog.text


async def test_an_unknown_model_at_start_up(
    cloud_provider: Provider, caplog: pytest.LogCaptureFixture
) -> None:
    backend = load_backend(
        cloud_provider.backend, _settings(cloud_provider, models=("no-such-model",))
    )
    if cloud_provider.backend == "openai":
        # llama.cpp and friends answer to any model name: only warn.
        async with backend:
            pass
        assert "model not listed by server" in caplog.text
        return
    with pytest.raises(ConfigError, match="no-such-model"):
        async with backend:
            pass


async def test_an_unreachable_endpoint_stops_start_up(
    backend: str, clean_env: pytest.MonkeyPatch
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens on `port` now: every connection is refused at once.
    suffix = "/v1" if backend == "openai" else ""
    url = f"http://proxy-user:proxy-secret@127.0.0.1:{port}{suffix}"
    settings = BackendSettings(models=(MODEL,), base_url=url)
    with pytest.raises(ConfigError, match=r"(cannot reach|does not answer)") as raised:
        async with load_backend(backend, settings):
            pass
    # A proxy's credentials in the address stay out of the message.
    assert "proxy-secret" not in str(raised.value)
    assert f"***@127.0.0.1:{port}" in str(raised.value)


async def test_the_base_url_comes_from_the_conventional_variable(
    provider: Provider, clean_env: pytest.MonkeyPatch
) -> None:
    address = provider.base_url
    if provider.backend == "ollama":
        address = address.removeprefix("http://")  # OLLAMA_HOST is usually host:port
    clean_env.setenv(BASE_URL_VARIABLE[provider.backend], address)
    async with load_backend(provider.backend, BackendSettings(models=(MODEL,))) as backend:
        generation = await backend.generate(Task(id="env-1", prompt="where"), MODEL, None)
    assert generation.text == "fake answer to where"
    assert len(provider.fake.calls_for("where")) == 1


# google-genai sends no retry counter; its call counts are checked in test_taxonomy.py.
@pytest.mark.parametrize("cloud_backend", ["groq", "openai"])
async def test_cloud_clients_make_exactly_one_attempt(cloud_provider: Provider) -> None:
    async with load_backend(cloud_provider.backend, _settings(cloud_provider)) as backend:
        await backend.generate(Task(id="once-1", prompt="count me"), MODEL, None)
    (call,) = cloud_provider.fake.calls_for("count me")
    assert call.headers.get("x-stainless-retry-count") == "0"


@pytest.mark.parametrize("cloud_backend", ["groq", "openai"])
async def test_an_account_out_of_credit_is_a_worker_problem(cloud_provider: Provider) -> None:
    cloud_provider.fake.plan("costly", no_quota())
    async with load_backend(cloud_provider.backend, _settings(cloud_provider)) as backend_:
        with pytest.raises(
            WorkerFatalError, match=r"insufficient_quota|exceeded your current quota"
        ):
            await backend_.generate(Task(id="quota-1", prompt="costly"), MODEL, None)
    assert len(cloud_provider.fake.calls_for("costly")) == 1


@pytest.fixture
async def ollama(clean_env: pytest.MonkeyPatch) -> AsyncIterator[FakeOllama]:
    async with serving(FakeOllama(models=set(), registry={MODEL})) as fake:
        yield fake


async def test_ollama_refuses_a_missing_model_without_pull(ollama: FakeOllama) -> None:
    settings = BackendSettings(models=(MODEL,), base_url=ollama.url)
    with pytest.raises(
        ConfigError, match=f"run `ollama pull {MODEL}` or start the worker with --pull"
    ):
        async with load_backend("ollama", settings):
            pass


async def test_ollama_pulls_a_missing_model_with_progress(
    ollama: FakeOllama, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    settings = BackendSettings(models=(MODEL,), base_url=ollama.url, pull=True)
    async with load_backend("ollama", settings) as backend:
        generation = await backend.generate(Task(id="pulled-1", prompt="hi"), MODEL, None)
    assert generation.text == "fake answer to hi"
    assert f"pull progress model={MODEL} status=pulling 0123abcd percent=100" in caplog.text
    assert f"model pulled model={MODEL}" in caplog.text
    assert [call.path for call in ollama.calls] == ["/api/pull", "/api/generate"]


@pytest.mark.parametrize("streamed", [False, True])
async def test_ollama_sends_prompts_to_generate_and_messages_to_chat(
    ollama: FakeOllama, streamed: bool
) -> None:
    ollama.models.add(MODEL)
    pieces: list[str] = []

    async def on_piece(piece: str) -> None:
        pieces.append(piece)

    settings = BackendSettings(models=(MODEL,), base_url=ollama.url)
    tasks = [
        Task(id="g-1", prompt="mutate this prompt", system="You are D8"),
        Task(id="g-2", prompt="plain prompt"),
        Task(id="c-1", messages=[Message(role="user", content="a chat")], system="You are D8"),
    ]
    async with load_backend("ollama", settings) as backend:
        texts = [
            (await backend.generate(t, MODEL, on_piece if streamed else None)).text for t in tasks
        ]

    assert texts == [
        "fake answer to mutate this prompt",
        "fake answer to plain prompt",
        "fake answer to a chat",
    ]
    generate, plain, chat = ollama.calls
    assert (generate.path, generate.body["system"], generate.stream) == (
        "/api/generate",
        "You are D8",
        streamed,
    )
    assert plain.path == "/api/generate" and "system" not in plain.body, "the model's own"
    assert chat.path == "/api/chat"
    assert chat.body["messages"][0] == {"role": "system", "content": "You are D8"}
    assert ("".join(pieces) == "".join(texts)) if streamed else pieces == []


async def test_ollama_says_when_a_model_cannot_be_pulled(ollama: FakeOllama) -> None:
    settings = BackendSettings(models=("no-such-model",), base_url=ollama.url, pull=True)
    with pytest.raises(ConfigError, match="could not pull 'no-such-model': pull model manifest"):
        async with load_backend("ollama", settings):
            pass


@pytest.mark.parametrize(("setting", "sent"), [(None, "30m"), ("-1", -1), ("2h", "2h")])
async def test_ollama_keeps_the_model_loaded(
    ollama: FakeOllama, clean_env: pytest.MonkeyPatch, setting: str | None, sent: object
) -> None:
    if setting is not None:
        clean_env.setenv("D8_OLLAMA_KEEP_ALIVE", setting)
    ollama.models.add(MODEL)
    async with load_backend(
        "ollama", BackendSettings(models=(MODEL,), base_url=ollama.url)
    ) as backend:
        await backend.generate(Task(id="ka-1", prompt="stay"), MODEL, None)
    assert ollama.calls_for("stay")[0].body["keep_alive"] == sent


@pytest.mark.parametrize("backend", sorted(SDK_MODULE))
def test_a_missing_sdk_says_how_to_install_it(backend: str, tmp_path: object) -> None:
    # `sys.modules[name] = None` makes `import name` fail as if it were not installed.
    script = (
        "import sys\n"
        f"sys.modules[{SDK_MODULE[backend]!r}] = None\n"
        "from mesh.cli import main\n"
        f"main(['worker', '--backend', {backend!r}, '--model', 'm'])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "NATS_URL": "nats://127.0.0.1:1"},
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "pip install 'd8-mesh[cloud]'" in done.stderr
    assert "Traceback" not in done.stderr


def _settings(provider: Provider, *, models: tuple[str, ...] = (MODEL,)) -> BackendSettings:
    return BackendSettings(models=models, base_url=provider.base_url, timeout_s=5.0)
