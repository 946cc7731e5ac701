"""GET /stats and GET /stats/{name}: configuration, running statistics and counters."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.responses import Response

from ...wire.stats import encode_layer, encode_server
from ..deps import EngineDep, LayerName, ReadAccess
from ..responses import json_response
from ..schemas import LayerEntry, StatsResponse, errors

router = APIRouter(tags=["stats"], dependencies=[ReadAccess])


@router.get("/stats", response_model=StatsResponse, responses=errors(401, 403))
def stats(engine: EngineDep) -> Response:
    """Every layer's entry, and server-wide counters."""
    return json_response(encode_server(engine.server_info()))


@router.get("/stats/{name}", response_model=LayerEntry, responses=errors(401, 403, 404, 422))
def layer_stats(name: LayerName, engine: EngineDep) -> Response:
    """One layer: kind, device, configuration, running statistics, counters."""
    return json_response(encode_layer(engine.layer_info(name)))
