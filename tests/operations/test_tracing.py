"""One trace from submit to result write, across the orchestrator and a real worker process."""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from mesh import tracing
from mesh.contract import Task
from mesh.errors import ConfigError
from tests.helpers import WorkerProcess, orchestrator_for, poll_until

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

pytestmark = pytest.mark.anyio


class _Receiver(ThreadingHTTPServer):
    spans: list[dict[str, Any]]


class _OtlpHandler(BaseHTTPRequestHandler):
    """Accepts OTLP/HTTP protobuf trace exports, as a collector's :4318 does."""

    server: _Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        request = ExportTraceServiceRequest.FromString(body)
        for resource_spans in request.resource_spans:
            attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.server.spans.append(
                        {
                            "service": attributes.get("service.name"),
                            "name": span.name,
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent_id": span.parent_span_id.hex(),
                        }
                    )
        reply = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args: object) -> None:
        return None


@pytest.fixture
def otlp_receiver() -> Iterator[_Receiver]:
    server = _Receiver(("127.0.0.1", 0), _OtlpHandler)
    server.spans = []
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def in_memory_spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.configure(provider)
    try:
        yield exporter
    finally:
        tracing.shutdown()


@pytest.mark.parametrize(
    ("env", "wanted"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, False),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, False),
    ],
)
def test_tracing_is_on_only_when_otel_variables_ask(env: dict[str, str], wanted: bool) -> None:
    assert tracing.wants_tracing(env) is wanted


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"OTEL_TRACES_EXPORTER": "zipkin"},
            "OTEL_TRACES_EXPORTER='zipkin': d8 ships `otlp` and `console`",
        ),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            "d8 exports OTLP over http/protobuf; point OTEL_EXPORTER_OTLP_ENDPOINT at",
        ),
    ],
)
def test_an_unsupported_exporter_is_a_config_error(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        tracing.configure_from_env("d8-test", env)
    assert message in str(caught.value)
    assert not tracing.is_enabled()


def test_tracing_off_costs_no_allocation_per_task() -> None:
    assert not tracing.is_enabled()
    runner, backend = object(), object()
    assert tracing.traced_runner(runner) is runner  # type: ignore[arg-type]
    assert tracing.traced_backend(backend) is backend  # type: ignore[arg-type]
    assert tracing.span("a", "t1") is tracing.span("b")
    assert tracing.submit_headers("t1", "tasks.chat.any") == {"Nats-Msg-Id": "t1"}
    before = sys.getallocatedblocks()
    for _ in range(10_000):
        with tracing.span("d8 result write", "t1"):
            pass
    assert sys.getallocatedblocks() - before < 100


async def test_spans_of_orchestrator_and_worker_process_share_one_trace(
    nats_url: str,
    tmp_path: Path,
    otlp_receiver: _Receiver,
    in_memory_spans: InMemorySpanExporter,
) -> None:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp_receiver.server_port}",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_SERVICE_NAME": "pi-worker",
        "D8_LOG_JSON": "1",
    }
    async with orchestrator_for(nats_url) as orch:
        worker = WorkerProcess(
            nats_url, "--worker-id", "traced", env=env, log_path=tmp_path / "w.log"
        )
        try:
            await poll_until(lambda: "traced" in orch.workers, timeout_s=20, what="worker")
            # Fails once, so the retry warning is logged inside the worker's span.
            flaky = {"echo": {"fail": "transient", "fail_times": 1}}
            await orch.submit(Task(id="traced-1", prompt="x", metadata=flaky))
            result = await orch.wait("traced-1", timeout_s=20)
        finally:
            code = worker.stop()
        await poll_until(
            lambda: sum(s["name"] == "d8 run" for s in otlp_receiver.spans) == 2,
            what="exported spans",
        )
    assert code == 0 and result is not None and result.status == "ok"

    submit = next(s for s in in_memory_spans.get_finished_spans() if s.name == "d8 submit")
    trace_id = format(submit.context.trace_id, "032x")
    submit_id = format(submit.context.span_id, "016x")
    remote = otlp_receiver.spans
    assert {s["trace_id"] for s in remote} == {trace_id}
    assert {s["service"] for s in remote} == {"pi-worker"}
    runs = [s for s in remote if s["name"] == "d8 run"]
    assert all(s["parent_id"] == submit_id for s in runs)
    waits = [s for s in remote if s["name"] == "d8 queue wait"]
    assert len(waits) == 2 and all(s["parent_id"] == submit_id for s in waits)
    run_ids = {s["span_id"] for s in runs}
    backend = [s for s in remote if s["name"] == "d8 backend echo"]
    writes = [s for s in remote if s["name"] == "d8 result write"]
    assert len(backend) == 2 and {s["parent_id"] for s in backend} == run_ids
    assert len(writes) == 1 and writes[0]["parent_id"] in run_ids

    retried = [
        json.loads(line) for line in worker.log().splitlines() if "task will be retried" in line
    ]
    assert retried and retried[0]["task_id"] == "traced-1" and retried[0]["trace_id"] == trace_id


async def test_an_in_process_round_trip_is_one_trace(
    nats_url: str, in_memory_spans: InMemorySpanExporter
) -> None:
    from tests.helpers import running_worker, worker_settings

    async with orchestrator_for(nats_url) as orch, running_worker(worker_settings(nats_url)):
        await orch.submit(Task(id="local-1", prompt="x"))
        assert await orch.wait("local-1", timeout_s=10) is not None
        await poll_until(
            lambda: any(s.name == "d8 run" for s in in_memory_spans.get_finished_spans()),
            what="spans",
        )
    spans = in_memory_spans.get_finished_spans()
    names = sorted(s.name for s in spans)
    assert names == ["d8 backend echo", "d8 queue wait", "d8 result write", "d8 run", "d8 submit"]
    assert len({s.context.trace_id for s in spans}) == 1
