"""Log formatting for the CLI: `event key=value` lines, or JSON with one flag."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time

__all__ = ["LEVELS", "SECRET_VARIABLES", "configure_logging", "hide_secrets", "secret_values"]

LEVELS = ("debug", "info", "warning", "error")

#: Variables whose values are secrets wherever they turn up: log lines, errors, results.
SECRET_VARIABLES = (
    "GROQ_API_KEY",
    "GEMINI_API_KEY",
    "GOOGLE_API_KEY",
    "OPENAI_API_KEY",
    "OLLAMA_API_KEY",
    "NATS_PASSWORD",
    "NATS_TOKEN",
)


def secret_values() -> list[str]:
    """The values of the `SECRET_VARIABLES` that are set, longest first."""
    values = {os.environ.get(name) for name in SECRET_VARIABLES}
    return sorted((v for v in values if v), key=len, reverse=True)


# `scheme://user:password@` in any URL a library logs (a --base-url or NATS_URL with them).
_URL_CREDENTIALS = re.compile(r"(?<=://)[^/@\s'\"]+@")


def hide_secrets(text: str, secrets: list[str]) -> str:
    """`text` with each of `secrets` and the credentials of every URL replaced by `***`."""
    for secret in secrets:
        text = text.replace(secret, "***")
    return _URL_CREDENTIALS.sub("***@", text) if "@" in text else text


class _RedactingFormatter(logging.Formatter):
    """Another formatter's lines with every secret value and the credentials of every URL
    replaced by `***`: a traceback or a library's message that quotes them is safe to ship."""

    def __init__(self, inner: logging.Formatter, secrets: list[str]) -> None:
        super().__init__()
        self._inner = inner
        self._secrets = secrets

    def format(self, record: logging.LogRecord) -> str:
        return hide_secrets(self._inner.format(record), self._secrets)


class _JsonFormatter(logging.Formatter):
    """One JSON object per line; `key=value` pairs in the message become fields."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        event, _, rest = message.partition(" ")
        fields: dict[str, object] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        words = rest.split(" ")
        plain = [w for w in words if "=" not in w]
        fields["event"] = " ".join([event, *plain]).strip()
        for word in words:
            key, sep, value = word.partition("=")
            if sep:
                fields[key] = value
        # Set by mesh.tracing.TraceLogFilter inside a span, when tracing is on.
        trace_id = getattr(record, "trace_id", None)
        if trace_id:
            fields["trace_id"] = trace_id
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        return json.dumps(fields, default=str)


def configure_logging(level: str = "info", *, json_lines: bool = False) -> None:
    """Send logs to stderr; only the CLI calls this."""
    handler = logging.StreamHandler(sys.stderr)
    formatter: logging.Formatter
    if json_lines:
        formatter = _JsonFormatter()
    else:
        formatter = logging.Formatter(
            "%(asctime)s %(levelname).1s %(name)s: %(message)s", "%H:%M:%S"
        )
        formatter.converter = time.gmtime
    handler.setFormatter(_RedactingFormatter(formatter, secret_values()))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Third-party chatter stays at warning unless asked for debug.
    if level.lower() != "debug":
        for name in ("httpx", "httpx2", "httpcore", "uvicorn.access", "nats"):
            logging.getLogger(name).setLevel(logging.WARNING)
