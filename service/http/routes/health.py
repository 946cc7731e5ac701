"""Liveness and readiness, open to everyone; metrics, open unless reads are protected."""

from __future__ import annotations

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import Response

from ...core.errors import NotReadyError
from ..deps import EngineDep, ReadAccess
from ..responses import json_response
from ..schemas import Health, Readiness, errors

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Alive", response_model=Health)
async def healthz() -> Response:
    """200 while the process serves requests."""
    return json_response({"status": "alive"})


@router.get("/readyz", summary="Ready", response_model=Readiness, responses=errors(503))
async def readyz(request: Request, engine: EngineDep) -> Response:
    """200 once every catalog layer is loaded, 503 before (saying what it waits for).

    Once loaded, ``status`` is "degraded" while changes are refused (a state database that
    cannot be reached, a state dir that cannot be written): eval is still served, from the
    last state known, and ``persistence`` says what is wrong.
    """
    layers, persistence = engine.readiness()
    if not request.app.state.ready:
        raise NotReadyError(persistence if persistence.startswith("starting: ") else None)
    status = "ready" if persistence in ("durable", "memory") else "degraded"
    return json_response({"status": status, "layers": layers, "persistence": persistence})


@router.get("/metrics", summary="Prometheus metrics",
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}, **errors(401, 403)},
            response_class=Response, dependencies=[ReadAccess])
def metrics(request: Request) -> Response:
    """Prometheus text format; needs the token when reads are protected (it names every
    layer)."""
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
