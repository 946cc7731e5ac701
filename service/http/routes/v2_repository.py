"""The V2 extensions beyond infer, in Triton's shapes, so tritonclient's calls work:

    POST /v2/repository/index                       every layer, its version and state
    POST /v2/repository/models/{name}/load          serve an unloaded layer again (token)
    POST /v2/repository/models/{name}/unload        stop serving it, keep its state (token)
    GET  /v2/models/{name}[/versions/{v}]/config    its configuration
    GET  /v2/models[/{name}[/versions/{v}]]/stats   statistics, of one layer or all

Unloading is not a change of state: it is not journaled, and a restart serves every layer.
Errors are answered the V2 way (``v2.V2Route``).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from ...wire import v2_repository as codec
from ...wire import v2_types
from ..deps import ReadAccess, WriteAccess, off_loop, read_body
from ..responses import json_response
from ..schemas import errors
from .v2 import V2Route

router = APIRouter(prefix="/v2", tags=["v2"], route_class=V2Route)
# Load and unload answer 200 with an empty body, as Triton does.
_EMPTY = {200: {"description": "Done (no body)", "content": {}},
          **errors(400, 401, 403, 404)}


async def _json(request: Request):
    body = await read_body(request)
    return await off_loop(len(body), codec.decode_request, body, request.app.state.limits)


# --- repository -------------------------------------------------------------------------


@router.post("/repository/index", summary="V2 repository index",
             responses=errors(400, 401, 403), dependencies=[ReadAccess])
async def repository_index(request: Request) -> Response:
    """Every layer with its version and state (READY, or UNAVAILABLE once unloaded); with
    ``{"ready": true}``, the served ones only."""
    ready_only = codec.decode_index_request(await _json(request))
    layers = request.app.state.engine.server_info().layers
    return json_response(codec.repository_index(layers, ready_only))


@router.post("/repository/models/{name}/load", summary="V2 repository load",
             response_class=Response, responses=_EMPTY, dependencies=[WriteAccess])
async def load(name: str, request: Request) -> Response:
    """Serve an unloaded layer again, with the state it had."""
    codec.decode_load_request(await _json(request))
    request.app.state.engine.load_layer(name)
    return Response()


@router.post("/repository/models/{name}/unload", summary="V2 repository unload",
             response_class=Response, responses=_EMPTY, dependencies=[WriteAccess])
async def unload(name: str, request: Request) -> Response:
    """Stop serving a layer (infer and ready answer 404) and keep it, state and all."""
    await _json(request)
    request.app.state.engine.unload_layer(name)
    return Response()


# --- configuration and statistics -------------------------------------------------------


@router.get("/models/stats", summary="V2 statistics of every model",
            responses=errors(401, 403), dependencies=[ReadAccess])
def all_statistics(request: Request) -> Response:
    return json_response(codec.model_statistics(request.app.state.engine.server_info().layers))


@router.get("/models/{name}/stats", summary="V2 model statistics",
            responses=errors(401, 403, 404), dependencies=[ReadAccess])
def statistics(name: str, request: Request) -> Response:
    return json_response(codec.model_statistics([_info(request, name, None)]))


@router.get("/models/{name}/versions/{version}/stats", summary="V2 model version statistics",
            responses=errors(401, 403, 404), dependencies=[ReadAccess])
def version_statistics(name: str, version: str, request: Request) -> Response:
    return json_response(codec.model_statistics([_info(request, name, version)]))


@router.get("/models/{name}/config", summary="V2 model configuration",
            responses=errors(401, 403, 404), dependencies=[ReadAccess])
def config(name: str, request: Request) -> Response:
    """Triton's model configuration: tensors with their dims (-1 where free) and the
    layer's constructor arguments as parameters."""
    return json_response(codec.model_config(_info(request, name, None)))


@router.get("/models/{name}/versions/{version}/config",
            summary="V2 model version configuration", responses=errors(401, 403, 404),
            dependencies=[ReadAccess])
def version_config(name: str, version: str, request: Request) -> Response:
    return json_response(codec.model_config(_info(request, name, version)))


def _info(request: Request, name: str, version: str | None):
    info = request.app.state.engine.layer_info(name)
    if version is not None:
        v2_types.check_version(name, version, info.version)
    return info
