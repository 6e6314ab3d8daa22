"""Any OpenAI-compatible server (OpenAI, llama.cpp server, vLLM, LM Studio) through `openai`."""

from __future__ import annotations

from mesh.errors import ConfigError

try:
    import httpx2
    import openai
except ImportError:
    raise ConfigError(
        "the openai backend needs the openai package: pip install 'd8-mesh[cloud]'"
    ) from None

from workers.backends._chat_completions import ChatCompletionsBackend, Flavour

__all__ = ["OpenAIBackend"]


class OpenAIBackend(ChatCompletionsBackend):
    """Chat on an OpenAI-style server; `OPENAI_BASE_URL` (with `/v1`) picks which one."""

    name = "openai"
    flavour = Flavour(
        name="openai",
        provider="OpenAI-compatible server",
        sdk=openai,
        http=httpx2,
        client_class=openai.AsyncOpenAI,
        # Local servers that need no key accept any value; the client insists on one.
        key_variables=("OPENAI_API_KEY",),
        base_url_variable="OPENAI_BASE_URL",
        example_model="gpt-4o-mini",
        # llama.cpp and others serve whatever they loaded under any name: warn, do not refuse.
        strict_models=False,
        stream_usage={"stream_options": {"include_usage": True}},
    )
