"""A fake Groq: the OpenAI protocol under `/openai/v1`, with Groq's timings and `x_groq` usage."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tests.fakes.openai_api import FakeOpenAI

__all__ = ["FakeGroq"]

# Groq reports how long each phase took, in seconds; these are plausible for a small model.
QUEUE_TIME_S = 0.004
PROMPT_TIME_S = 0.002
TOKENS_PER_S = 800.0


@dataclass
class FakeGroq(FakeOpenAI):
    """Groq's flavour of chat completions."""

    prefix: str = "/openai/v1"

    def _usage(self, prompt: str, text: str) -> dict[str, Any]:
        usage = super()._usage(prompt, text)
        completion_time_s = usage["completion_tokens"] / TOKENS_PER_S
        usage.update(
            queue_time=QUEUE_TIME_S,
            prompt_time=PROMPT_TIME_S,
            completion_time=completion_time_s,
            total_time=PROMPT_TIME_S + completion_time_s,
        )
        return usage

    def _final_usage(self, model: str, usage: dict[str, Any], body: dict[str, Any]) -> list[str]:
        # Groq puts usage in `x_groq` of a last, choice-less chunk whether asked or not.
        return [self._chunk(model, [], x_groq={"id": "req_fake", "usage": usage})]
