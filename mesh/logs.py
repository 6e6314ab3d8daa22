"""Log formatting for the CLI: `event key=value` lines, or JSON with one flag."""

from __future__ import annotations

import json
import logging
import sys
import time

__all__ = ["configure_logging"]


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
    if json_lines:
        handler.setFormatter(_JsonFormatter())
    else:
        formatter = logging.Formatter(
            "%(asctime)s %(levelname).1s %(name)s: %(message)s", "%H:%M:%S"
        )
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Third-party chatter stays at warning unless asked for debug.
    if level.lower() != "debug":
        for name in ("httpx", "uvicorn.access", "nats"):
            logging.getLogger(name).setLevel(logging.WARNING)
