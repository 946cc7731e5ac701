"""GET /stats and GET /stats/{name}: configuration, running statistics and counters."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.responses import Response

from ..codec import dumps
from ..schemas import LayerEntry, StatsResponse, errors
from .deps import EngineDep, LayerName, ReadAccess

router = APIRouter(tags=["stats"], dependencies=[ReadAccess])


@router.get("/stats", response_model=StatsResponse, responses=errors(401, 403))
def stats(engine: EngineDep) -> Response:
    """Every layer's entry, and server-wide counters."""
    return Response(dumps(engine.stats()), media_type="application/json")


@router.get("/stats/{name}", response_model=LayerEntry, responses=errors(401, 403, 404, 422))
def layer_stats(name: LayerName, engine: EngineDep) -> Response:
    """One layer: kind, device, configuration, running statistics, counters."""
    return Response(dumps(engine.layer_entry(name)), media_type="application/json")
