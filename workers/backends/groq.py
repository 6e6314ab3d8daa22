"""Groq's cloud API through the `groq` async client, with its own retries off."""

from __future__ import annotations

from mesh.errors import ConfigError

try:
    import groq
    import httpx
except ImportError:
    raise ConfigError(
        "the groq backend needs the groq package: pip install 'd8-mesh[cloud]'"
    ) from None

from workers.backends._chat_completions import ChatCompletionsBackend, Flavour

__all__ = ["GroqBackend"]


class GroqBackend(ChatCompletionsBackend):
    """Chat on Groq; the key comes from `GROQ_API_KEY`, the address from `GROQ_BASE_URL`."""

    name = "groq"
    flavour = Flavour(
        name="groq",
        provider="Groq",
        sdk=groq,
        http=httpx,
        client_class=groq.AsyncGroq,
        key_variables=("GROQ_API_KEY",),
        # Without the `/openai/v1` suffix: the client adds it.
        base_url_variable="GROQ_BASE_URL",
        example_model="llama-3.1-8b-instant",
        strict_models=True,
        # groq 1.7's create() has no stream_options parameter; usage also comes in x_groq.
        stream_usage={"extra_body": {"stream_options": {"include_usage": True}}},
    )
