"""OpenTelemetry tracing across the mesh: one trace from submit to the result write.

The orchestrator puts a W3C `traceparent` into the task's NATS headers; the worker takes it
out and opens its spans under it:

    d8 submit (orchestrator)
    ├── d8 queue wait (from the stream's timestamp to delivery)
    └── d8 run (worker)
        ├── d8 backend <name> (the LLM call)
        └── d8 result write

Tracing is off unless the standard `OTEL_*` variables ask for it: `OTEL_TRACES_EXPORTER`
(`otlp` or `console`) or an OTLP endpoint (`OTEL_EXPORTER_OTLP_ENDPOINT`,
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`). `OTEL_SDK_DISABLED=true` wins over both. When off,
every hook here is a module-global check that returns a shared object: no span, no header,
no allocation per task. The decision is taken once per process, at start-up.
"""

from __future__ import annotations

import atexit
import logging
import os
import time
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any, Self, cast

from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from mesh.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Mapping
    from types import TracebackType

    from nats.aio.msg import Msg
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

    from mesh.contract import Task
    from workers.backends import Backend, Generation, OnPiece
    from workers.execution import Outcome, TaskRunner

__all__ = [
    "TraceLogFilter",
    "configure",
    "configure_from_env",
    "current_trace_id",
    "is_enabled",
    "shutdown",
    "span",
    "submit_headers",
    "traced_backend",
    "traced_runner",
    "wants_tracing",
]

logger = logging.getLogger(__name__)

_SCOPE = "d8-mesh"
# Shared by every call while tracing is off: `with span(...)` then allocates nothing.
_NO_SPAN: AbstractContextManager[None] = nullcontext()
_tracer: Tracer | None = None
_provider: TracerProvider | None = None


def is_enabled() -> bool:
    """Whether this process records spans."""
    return _tracer is not None


def wants_tracing(env: Mapping[str, str] | None = None) -> bool:
    """Whether the `OTEL_*` variables ask for traces."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter:
        return exporter != "none"
    return bool(
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
        or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    )


def configure_from_env(service_name: str, env: Mapping[str, str] | None = None) -> bool:
    """Turn tracing on when the `OTEL_*` variables ask for it; return whether it is on.

    Raises:
        ConfigError: an exporter we do not ship was asked for, or the OTLP exporter package
            is not installed.
    """
    env = os.environ if env is None else env
    if not wants_tracing(env):
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES itself; ours is
    # only the default.
    attributes = {} if env.get("OTEL_SERVICE_NAME") else {"service.name": service_name}
    # Our own `shutdown` flushes at exit (once, also when the CLI already called it).
    provider = TracerProvider(resource=Resource.create(attributes), shutdown_on_exit=False)
    names = env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() or "otlp"
    for name in (n.strip() for n in names.split(",") if n.strip()):
        provider.add_span_processor(BatchSpanProcessor(_exporter(name, env)))
    configure(provider)
    atexit.register(shutdown)
    logger.info("tracing on service=%s exporters=%s", service_name, names)
    return True


def _exporter(name: str, env: Mapping[str, str]) -> Any:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if name != "otlp":
        raise ConfigError(f"OTEL_TRACES_EXPORTER={name!r}: d8 ships `otlp` and `console`")
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
    )
    if protocol.strip() != "http/protobuf":
        # LIMITATION: only OTLP over HTTP; a gRPC collector needs its HTTP port (4318).
        raise ConfigError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: d8 exports OTLP over http/protobuf; "
            "point OTEL_EXPORTER_OTLP_ENDPOINT at the collector's HTTP port (usually 4318)"
        )
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        raise ConfigError(
            "OTLP trace export needs the exporter package: pip install 'd8-mesh[otlp]'"
        ) from None
    # The exporter reads OTEL_EXPORTER_OTLP_*ENDPOINT, HEADERS, TIMEOUT and COMPRESSION.
    return OTLPSpanExporter()


def configure(provider: TracerProvider) -> None:
    """Record spans through `provider` from now on (tests pass one with an in-memory exporter)."""
    global _tracer, _provider
    _provider = provider
    _tracer = provider.get_tracer(_SCOPE)


def shutdown() -> None:
    """Flush and stop; tracing is off afterwards."""
    global _tracer, _provider
    provider, _provider, _tracer = _provider, None, None
    if provider is not None:
        provider.shutdown()


def span(name: str, task_id: str | None = None) -> AbstractContextManager[Any]:
    """A span under the current one, or a shared no-op while tracing is off."""
    if _tracer is None:
        return _NO_SPAN
    attributes = {"d8.task_id": task_id} if task_id else None
    return _tracer.start_as_current_span(name, attributes=attributes)


def submit_headers(task_id: str, subject: str) -> dict[str, str]:
    """The NATS headers of a submitted task; with tracing on, a `d8 submit` span's context too."""
    headers = {"Nats-Msg-Id": task_id}
    if _tracer is None:
        return headers
    attributes = {
        "d8.task_id": task_id,
        "messaging.system": "nats",
        "messaging.destination.name": subject,
    }
    with _tracer.start_as_current_span("d8 submit", kind=SpanKind.PRODUCER, attributes=attributes):
        propagate.inject(headers)
    return headers


def current_trace_id() -> str | None:
    """The current trace id as 32 hex digits, or None outside a recorded span."""
    if _tracer is None:
        return None
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None


class TraceLogFilter(logging.Filter):
    """Adds `trace_id` to log records made inside a span (the JSON log format prints it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        trace_id = current_trace_id()
        if trace_id is not None:
            record.trace_id = trace_id
        return True


class _TracedRunner:
    """Runs a delivery under the context its task was submitted in."""

    def __init__(self, runner: TaskRunner, tracer: Tracer) -> None:
        self._runner = runner
        self._tracer = tracer
        self.paused_s = runner.paused_s

    async def run(self, msg: Msg) -> Outcome:
        parent = propagate.extract(msg.headers or {})
        received_ns = time.time_ns()
        published_ns = int(msg.metadata.timestamp.timestamp() * 1e9)
        attributes = {"messaging.system": "nats", "messaging.destination.name": msg.subject}
        waited = self._tracer.start_span(
            "d8 queue wait",
            context=parent,
            start_time=min(published_ns, received_ns),
            attributes=attributes,
        )
        waited.end(end_time=received_ns)
        with self._tracer.start_as_current_span(
            "d8 run", context=parent, kind=SpanKind.CONSUMER, attributes=attributes
        ) as current:
            outcome = await self._runner.run(msg)
            _describe(current, outcome)
            return outcome


def _describe(current: Span, outcome: Outcome) -> None:
    if outcome.task_id:
        current.set_attribute("d8.task_id", outcome.task_id)
    current.set_attribute("d8.attempt", outcome.attempt)
    current.set_attribute("d8.outcome", outcome.status)
    if outcome.status in ("error", "dead"):
        current.set_status(Status(StatusCode.ERROR, outcome.status))


def traced_runner(runner: TaskRunner) -> TaskRunner:
    """`runner` itself while tracing is off; else one that opens `d8 run` around each delivery."""
    if _tracer is None:
        return runner
    return cast("TaskRunner", _TracedRunner(runner, _tracer))


class _TracedBackend:
    """A backend whose calls are `d8 backend <name>` spans under the current one."""

    def __init__(self, backend: Backend, tracer: Tracer) -> None:
        self._backend = backend
        self._tracer = tracer
        self.name = backend.name
        self.models = backend.models
        self.default_concurrency = backend.default_concurrency
        self.costly = backend.costly

    async def __aenter__(self) -> Self:
        await self._backend.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self._backend.__aexit__(exc_type, exc, traceback)

    async def generate(self, task: Task, model: str, on_piece: OnPiece | None) -> Generation:
        attributes = {
            "gen_ai.request.model": model,
            "gen_ai.system": self.name,
            "d8.task_id": task.id,
        }
        with self._tracer.start_as_current_span(
            f"d8 backend {self.name}", kind=SpanKind.CLIENT, attributes=attributes
        ) as current:
            generation = await self._backend.generate(task, model, on_piece)
            current.set_attribute("gen_ai.usage.input_tokens", generation.usage.prompt_tokens)
            current.set_attribute("gen_ai.usage.output_tokens", generation.usage.completion_tokens)
            return generation


def traced_backend(backend: Backend) -> Backend:
    """`backend` itself while tracing is off; else one whose calls are child spans."""
    if _tracer is None:
        return backend
    return cast("Backend", _TracedBackend(backend, _tracer))
