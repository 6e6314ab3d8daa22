"""A small HTTP API for callers that do not speak NATS (port 7001 by default, as in D8).

POST /tasks            one task or a list; `?wait=S` waits up to S seconds for results
GET  /results/{id}     the result; `?wait=S` waits for it; 404 while there is none
GET  /workers          live workers and their last heartbeats
GET  /health           200 when NATS is connected, 503 otherwise
GET  /status           workers, queues and recent failures from JetStream (as `d8 status`)
GET  /metrics          Prometheus text
GET  /dashboard        a page that shows /status and redraws itself
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

from mesh.contract import Task
from mesh.errors import SubmitError, TaskRejectedError, TaskTooLargeError
from orchestrator.dashboard import operator_routes

if TYPE_CHECKING:
    from starlette.requests import Request

    from orchestrator.core import Orchestrator

__all__ = ["create_app"]

MAX_WAIT_S = 600.0
# A batch of about 30,000 D8-sized tasks; larger batches go in several requests.
MAX_BODY_BYTES = 32 * 1024 * 1024
_tasks_decoder = msgspec.json.Decoder(Task | list[Task])
_encoder = msgspec.json.Encoder()


def _json(body: Any, status: int = 200) -> Response:
    return Response(_encoder.encode(body), status_code=status, media_type="application/json")


def _wait_s(request: Request) -> float:
    raw = request.query_params.get("wait", "0")
    try:
        wait_s = float(raw)
    except ValueError:
        raise _BadRequest(f"wait={raw!r} is not a number of seconds") from None
    if not 0 <= wait_s <= MAX_WAIT_S:
        raise _BadRequest(f"wait={raw} must be between 0 and {MAX_WAIT_S:g} seconds")
    return wait_s


class _BadRequest(Exception):
    """A request the API refuses with 400 and this message."""


class _TooLarge(Exception):
    """A request body over MAX_BODY_BYTES."""


async def _refuse(request: Request, exc: Exception) -> Response:
    if isinstance(exc, _TooLarge):
        message = f"request body over {MAX_BODY_BYTES} bytes: send fewer tasks per request"
        return _json({"error": {"type": "too_large", "message": message}}, 413)
    return _json({"error": {"type": "bad_request", "message": str(exc)}}, 400)


def _status(exc: SubmitError) -> int:
    """413 for a task too large, 400 for one no worker could run, 503 when NATS failed us."""
    if isinstance(exc, TaskTooLargeError):
        return 413
    if isinstance(exc, TaskRejectedError):
        return 400
    return 503


def create_app(orchestrator: Orchestrator) -> Starlette:
    """The Starlette app serving `orchestrator`."""

    async def submit(request: Request) -> Response:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise _TooLarge
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            raise _TooLarge
        try:
            decoded = _tasks_decoder.decode(body)
        except (msgspec.DecodeError, RecursionError) as exc:
            return _json({"error": {"type": "invalid_task", "message": str(exc)}}, 400)
        tasks = decoded if isinstance(decoded, list) else [decoded]
        wait_s = _wait_s(request)
        try:
            if wait_s > 0:
                submitted, results = await orchestrator.run(tasks, wait_s)
            else:
                submitted, results = await orchestrator.submit_many(tasks), {}
        except SubmitError as exc:
            return _json({"error": {"type": exc.type_name, "message": str(exc)}}, _status(exc))
        answer = {
            "submitted": [
                {"id": s.task_id, "subject": s.subject, "duplicate": s.duplicate} for s in submitted
            ],
            "results": [msgspec.to_builtins(r) for r in results.values()],
        }
        return _json(answer, 202 if len(results) < len({t.id for t in tasks}) else 200)

    async def result(request: Request) -> Response:
        task_id = request.path_params["task_id"]
        wait_s = _wait_s(request)
        try:
            found = await (
                orchestrator.wait(task_id, wait_s) if wait_s else orchestrator.result(task_id)
            )
        except TaskRejectedError as exc:
            return _json({"error": {"type": exc.type_name, "message": str(exc)}}, 400)
        if found is None:
            return _json({"id": task_id, "status": "pending"}, 404)
        return _json(found)

    async def workers(request: Request) -> Response:
        return _json({"workers": list(orchestrator.workers.values())})

    async def health(request: Request) -> Response:
        connected = orchestrator.nc.is_connected
        body = {
            "status": "ok" if connected else "down",
            "nats": connected,
            "workers": len(orchestrator.workers),
        }
        return _json(body, 200 if connected else 503)

    return Starlette(
        exception_handlers={_BadRequest: _refuse, _TooLarge: _refuse},
        routes=[
            Route("/tasks", submit, methods=["POST"]),
            Route("/results/{task_id}", result, methods=["GET"]),
            Route("/workers", workers, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            # /status, /metrics and /dashboard: the operator's view.
            *operator_routes(orchestrator),
        ],
    )
