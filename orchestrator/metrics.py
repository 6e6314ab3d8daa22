"""Prometheus metrics: `/metrics` on the orchestrator, and optionally on each worker.

Queue depths and live workers are read from JetStream at scrape time (the same snapshot as
`d8 status`). Outcomes, durations and tokens are counted from the results the orchestrator
sees written to the `results` bucket, so they cover every worker, wherever it runs.
Each exporter has its own registry: nothing is kept in prometheus-client's global one.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from mesh.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Iterator

    from orchestrator.core import Orchestrator
    from orchestrator.status import StatusCollector, StatusSnapshot
    from workers.runtime import Worker

__all__ = ["CONTENT_TYPE", "OrchestratorMetrics", "WorkerCollector", "serve_worker_metrics"]

logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# A scrape at most this often reads JetStream; more scrapers share the snapshot.
SNAPSHOT_MAX_AGE_S = 1.0
# From an echo task (milliseconds) to a long local generation on a Pi (minutes).
_DURATION_BUCKETS = (0.005, 0.025, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Timings(msgspec.Struct):
    queued_ms: float = 0.0
    run_ms: float = 0.0
    total_ms: float = 0.0


class _ResultFacts(msgspec.Struct):
    """The part of a `Result` the metrics need; the rest is skipped while decoding."""

    status: str = "unknown"
    backend: str | None = None
    capability: str | None = None
    usage: _Usage = msgspec.field(default_factory=_Usage)
    timings: _Timings = msgspec.field(default_factory=_Timings)


_facts_decoder = msgspec.json.Decoder(_ResultFacts)


class OrchestratorMetrics:
    """The orchestrator's metrics; counts results from the moment it is created."""

    def __init__(self, orchestrator: Orchestrator, collector: StatusCollector) -> None:
        self.registry = CollectorRegistry()
        self._collector = collector
        labels = ["status", "backend", "capability"]
        self.results = Counter(
            "d8_task_results",
            "Task results written, by status, backend and capability",
            labels,
            registry=self.registry,
        )
        self.duration = Histogram(
            "d8_task_duration_seconds",
            "From the task's storing in TASKS to its result",
            ["capability"],
            buckets=_DURATION_BUCKETS,
            registry=self.registry,
        )
        self.queued = Histogram(
            "d8_task_queued_seconds",
            "How long tasks waited in TASKS before a worker took them",
            ["capability"],
            buckets=_DURATION_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "d8_tokens", "Tokens reported by backends", ["kind", "backend"], registry=self.registry
        )
        self.undecodable = Counter(
            "d8_results_undecodable", "Results that could not be read", registry=self.registry
        )
        self._gauges = {
            name: Gauge(f"d8_queue_{name}", text, ["capability"], registry=self.registry)
            for name, text in (
                ("pending", "Tasks not yet delivered (consumer num_pending)"),
                ("in_flight", "Tasks delivered and not yet acked (consumer num_ack_pending)"),
                ("redelivered", "In-flight tasks delivered more than once"),
                ("dead", "Dead letters kept in DEAD for the capability"),
                ("workers", "Live workers serving the capability"),
            )
        }
        self.workers_alive = Gauge(
            "d8_workers_alive", "Workers with a live heartbeat", registry=self.registry
        )
        self.tasks_stored = Gauge(
            "d8_tasks_stored", "Messages in the TASKS stream", registry=self.registry
        )
        self.dead_total = Gauge(
            "d8_dead_letters", "Messages in the DEAD stream", registry=self.registry
        )
        orchestrator.result_observer = self.observe_result

    def observe_result(self, data: bytes) -> None:
        """Count one written result (called for every result the orchestrator sees)."""
        try:
            facts = _facts_decoder.decode(data)
        except msgspec.DecodeError:
            self.undecodable.inc()
            return
        capability = facts.capability or "unknown"
        backend = facts.backend or "unknown"
        self.results.labels(facts.status, backend, capability).inc()
        if facts.timings.total_ms:
            self.duration.labels(capability).observe(facts.timings.total_ms / 1000)
            self.queued.labels(capability).observe(facts.timings.queued_ms / 1000)
        if facts.usage.prompt_tokens:
            self.tokens.labels("prompt", backend).inc(facts.usage.prompt_tokens)
        if facts.usage.completion_tokens:
            self.tokens.labels("completion", backend).inc(facts.usage.completion_tokens)

    async def snapshot(self) -> StatusSnapshot:
        """The collector's latest snapshot when fresh enough, else a new one."""
        latest = self._collector.latest
        if latest is not None and time.time() - latest.taken_at < SNAPSHOT_MAX_AGE_S:
            return latest
        return await self._collector.collect()

    async def render(self) -> bytes:
        """The text exposition, with queue figures read from JetStream now."""
        snapshot = await self.snapshot()
        for gauge in self._gauges.values():
            gauge.clear()
        for queue in snapshot.queues:
            for name, value in (
                ("pending", queue.pending),
                ("in_flight", queue.in_flight),
                ("redelivered", queue.redelivered),
                ("dead", queue.dead),
                ("workers", queue.workers),
            ):
                self._gauges[name].labels(queue.capability).set(value)
        self.workers_alive.set(len(snapshot.workers))
        self.tasks_stored.set(snapshot.tasks_stored)
        self.dead_total.set(snapshot.dead_total)
        return generate_latest(self.registry)


class WorkerCollector:
    """A worker's own figures, read from the heartbeat it would send now."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    def collect(self) -> Iterator[GaugeMetricFamily]:
        heartbeat = self._worker.heartbeat()
        labels = ["worker_id", "backend"]
        values = [heartbeat.worker_id, heartbeat.backend]
        for name, text, value in (
            ("d8_worker_in_flight", "Tasks running now", heartbeat.in_flight),
            ("d8_worker_concurrency", "Tasks this worker runs at once", heartbeat.concurrency),
            ("d8_worker_completed", "Tasks completed ok since start", heartbeat.completed),
            ("d8_worker_failed", "Tasks failed since start", heartbeat.failed),
            ("d8_worker_rss_megabytes", "Resident memory", heartbeat.rss_mb),
            ("d8_worker_load_1m", "Host load average over one minute", heartbeat.load_1m),
            ("d8_worker_soc_temperature_celsius", "SoC temperature", heartbeat.soc_temp_c),
            ("d8_worker_throttled_bits", "vcgencmd get_throttled bits", heartbeat.throttled),
        ):
            if value is None:
                continue
            family = GaugeMetricFamily(name, text, labels=labels)
            family.add_metric(values, float(value))
            yield family


def serve_worker_metrics(worker: Worker, host: str, port: int) -> None:
    """Serve the worker's `/metrics` from a daemon thread (prometheus-client's own server)."""
    from prometheus_client import start_http_server

    registry = CollectorRegistry()
    registry.register(WorkerCollector(worker))
    try:
        start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise ConfigError(
            f"D8_METRICS_PORT={port}: cannot listen on {host}:{port} ({exc.strerror}); "
            "pick a free port or leave D8_METRICS_PORT unset"
        ) from None
    logger.info("worker metrics listening url=http://%s:%d/metrics", host, port)
