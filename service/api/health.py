"""Liveness, readiness and metrics: open to everyone, token or not."""

from __future__ import annotations

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import Response

from ..codec import dumps
from ..schemas import Health, Readiness, errors

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Alive", response_model=Health)
def healthz() -> Response:
    """200 while the process serves requests."""
    return Response(dumps({"status": "alive"}), media_type="application/json")


@router.get("/readyz", summary="Ready", response_model=Readiness, responses=errors(503))
def readyz(request: Request) -> Response:
    """200 once every catalog layer is loaded, 503 before."""
    if not request.app.state.ready:
        return Response(dumps({"error": "starting: catalog not loaded yet"}), 503,
                        media_type="application/json")
    return Response(dumps({"status": "ready", "layers": len(request.app.state.engine.store)}),
                    media_type="application/json")


@router.get("/metrics", summary="Prometheus metrics",
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}}, response_class=Response)
def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
