"""The operator's routes on the orchestrator's HTTP app: `/status`, `/metrics`, `/dashboard`.

All three read one `StatusCollector`, so the dashboard, `d8 watch` and Prometheus show the
same JetStream figures. The dashboard is one static page that fetches `/status` every two
seconds and draws it; it needs no build step and no assets from elsewhere.
"""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING

import msgspec
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from orchestrator.metrics import CONTENT_TYPE, OrchestratorMetrics
from orchestrator.status import StatusCollector

if TYPE_CHECKING:
    from collections.abc import Iterable

    from starlette.requests import Request

    from mesh.contract import Heartbeat
    from orchestrator.core import Orchestrator

__all__ = ["dashboard_html", "operator_routes"]

_encoder = msgspec.json.Encoder()


def dashboard_html() -> str:
    """The dashboard page, shipped next to this module."""
    return resources.files("orchestrator").joinpath("static/dashboard.html").read_text()


def operator_routes(orchestrator: Orchestrator) -> list[Route]:
    """Routes for the status JSON, Prometheus metrics and the dashboard page."""

    async def live_heartbeats() -> Iterable[Heartbeat]:
        # The orchestrator's KV watch of `workers` already holds every live heartbeat.
        return list(orchestrator.workers.values())

    collector = StatusCollector(lambda: orchestrator.js, live_heartbeats)
    metrics = OrchestratorMetrics(orchestrator, collector)
    page = dashboard_html()

    async def status(request: Request) -> Response:
        snapshot = await orchestrator.link.call(metrics.snapshot, "read the mesh's status")
        return Response(_encoder.encode(snapshot), media_type="application/json")

    async def prometheus(request: Request) -> Response:
        text = await orchestrator.link.call(metrics.render, "read the queue metrics")
        return Response(text, media_type=CONTENT_TYPE)

    async def dashboard(request: Request) -> Response:
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    return [
        Route("/status", status, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
        Route("/dashboard", dashboard, methods=["GET"]),
    ]
