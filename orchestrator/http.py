"""A small HTTP API for callers that do not speak NATS (port 7001 by default, as in D8).

POST /tasks            one task or a list; `?wait=S` waits up to S seconds for results
GET  /results/{id}     the result; `?wait=S` waits for it; 404 while there is none
GET  /workers          live workers and their last heartbeats
GET  /health           200 when NATS is connected, 503 otherwise
GET  /status           workers, queues and recent failures from JetStream (as `d8 status`)
GET  /metrics          Prometheus text
GET  /dashboard        a page that shows /status and redraws itself

Those that ask NATS answer 503 within `orchestrator.link.GRACE_S` while it is unreachable,
and /results answers 502 for a stored value that is not a result.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import msgspec
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

from mesh.contract import Task
from mesh.errors import (
    CorruptResultError,
    MeshError,
    NatsUnreachableError,
    SubmitError,
    TaskRejectedError,
    TaskTooLargeError,
)
from orchestrator.dashboard import operator_routes

if TYPE_CHECKING:
    from collections.abc import Sequence

    from starlette.requests import Request

    from mesh.contract import Result
    from orchestrator.core import Orchestrator, Submitted

__all__ = ["create_app"]

logger = logging.getLogger(__name__)

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


async def _unavailable(request: Request, exc: Exception) -> Response:
    """503 for NATS away, 502 for a corrupt stored result: one warning line, no traceback."""
    assert isinstance(exc, MeshError)
    status = 503 if isinstance(exc, NatsUnreachableError) else 502
    logger.warning("http request failed path=%s status=%d error=%s", request.url.path, status, exc)
    return _json({"error": {"type": exc.type_name, "message": str(exc)}}, status)


def _status(exc: SubmitError) -> int:
    """413 for a task too large, 400 for one no worker could run, 503 when NATS failed us."""
    if isinstance(exc, TaskTooLargeError):
        return 413
    if isinstance(exc, TaskRejectedError):
        return 400
    return 503


async def _capped_body(request: Request) -> bytes:
    """The body, read in pieces; a chunked upload over the cap is refused once it passes it,
    not after all of it sits in memory."""
    pieces: list[bytes] = []
    size = 0
    async for piece in request.stream():
        size += len(piece)
        if size > MAX_BODY_BYTES:
            raise _TooLarge
        pieces.append(piece)
    return b"".join(pieces)


def _no_result(task_id: str, wait_s: float) -> Response:
    # Not "pending": an id never submitted, or whose result expired, looks the same.
    waited = f"; none came within {wait_s:g}s" if wait_s else ""
    message = f"no result is stored for task {task_id} (yet){waited}"
    return _json({"id": task_id, "error": {"type": "no_result", "message": message}}, 404)


async def _submit(
    orchestrator: Orchestrator, tasks: list[Task], wait_s: float
) -> tuple[list[Submitted], dict[str, Result]]:
    """Submit, and wait up to `wait_s` for results; the publishing gives up if NATS is away."""
    task_ids = tuple(task.id for task in tasks)

    async def submit_while_connected(batch: Sequence[Task]) -> list[Submitted]:
        return await orchestrator.link.call(
            lambda: orchestrator.submit_many(batch), "submit", task_ids
        )

    if wait_s > 0:
        return await orchestrator.run(tasks, wait_s, submit=submit_while_connected)
    return await submit_while_connected(tasks), {}


def create_app(orchestrator: Orchestrator) -> Starlette:
    """The Starlette app serving `orchestrator`."""

    async def submit(request: Request) -> Response:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise _TooLarge
        body = await _capped_body(request)
        try:
            decoded = _tasks_decoder.decode(body)
        except (msgspec.DecodeError, RecursionError) as exc:
            return _json({"error": {"type": "invalid_task", "message": str(exc)}}, 400)
        tasks = decoded if isinstance(decoded, list) else [decoded]
        wait_s = _wait_s(request)
        try:
            submitted, results = await _submit(orchestrator, tasks, wait_s)
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
            found = await orchestrator.link.call(
                lambda: (
                    orchestrator.wait(task_id, wait_s) if wait_s else orchestrator.result(task_id)
                ),
                f"read the result of {task_id}",
            )
        except TaskRejectedError as exc:
            return _json({"error": {"type": exc.type_name, "message": str(exc)}}, 400)
        if found is None:
            return _no_result(task_id, wait_s)
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
        exception_handlers={
            _BadRequest: _refuse,
            _TooLarge: _refuse,
            NatsUnreachableError: _unavailable,
            CorruptResultError: _unavailable,
        },
        routes=[
            Route("/tasks", submit, methods=["POST"]),
            Route("/results/{task_id}", result, methods=["GET"]),
            Route("/workers", workers, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            # /status, /metrics and /dashboard: the operator's view.
            *operator_routes(orchestrator),
        ],
    )
