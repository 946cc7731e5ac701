"""Layer admin: create or replace, delete, reset, download and upload state.

Every route here changes or exposes whole layer state, so each needs the bearer token
when one is configured. Checkpoints are accepted as safetensors only.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from ...wire.admin import LayerCreate, decode_layer_request
from ...wire.stats import encode_layer
from ..deps import EngineDep, LayerName, WriteAccess, read_body
from ..responses import BINARY, json_response
from ..schemas import Deleted, LayerEntry, errors, json_body

router = APIRouter(prefix="/layers", tags=["admin"], dependencies=[WriteAccess])


@router.put(
    "/{name}", response_model=LayerEntry, responses=errors(400, 401, 403, 413, 422),
    openapi_extra=json_body(LayerCreate),
)
async def put_layer(name: LayerName, request: Request, engine: EngineDep) -> Response:
    """Create or replace a layer from its configuration and an optional safetensors
    checkpoint (base64 in ``checkpoint_b64``; ``prefix`` selects its keys)."""
    body = await read_body(request)
    # Off the loop: a checkpoint to parse, a layer to build, a record to make safe.
    return await run_in_threadpool(_put_layer, engine, name, body, request.app.state.limits)


def _put_layer(engine, name: str, body: bytearray, limits) -> Response:
    layer = decode_layer_request(body, limits)
    return _entry(engine.put_layer(name, layer.kind, layer.config, layer.checkpoint,
                                   layer.prefix, layer.device, layer.drift_threshold))


def _entry(info) -> Response:
    """A changed layer's entry; a wide layer's vectors are left out (``/stats/{name}``)."""
    return json_response(encode_layer(info, summary=True))


@router.delete("/{name}", response_model=Deleted, responses=errors(401, 403, 404, 422))
def delete_layer(name: LayerName, engine: EngineDep) -> Response:
    """Stop serving a layer."""
    engine.delete_layer(name)
    return json_response({"deleted": name})


@router.post("/{name}/reset", response_model=LayerEntry,
             responses=errors(401, 403, 404, 422))
def reset_layer(name: LayerName, engine: EngineDep) -> Response:
    """Return a layer to its checkpoint's statistics (torch's defaults without one)."""
    return _entry(engine.reset_layer(name))


@router.get(
    "/{name}/state",
    responses={200: {"content": {BINARY: {}}}, **errors(401, 403, 404, 422)},
    response_class=Response,
)
def download_state(name: LayerName, engine: EngineDep) -> Response:
    """The layer's current state as a safetensors file (torch.nn key names)."""
    return Response(
        engine.export_layer(name), media_type=BINARY,
        headers={"Content-Disposition": f'attachment; filename="{name}.safetensors"'},
    )


@router.put(
    "/{name}/state", response_model=LayerEntry,
    responses=errors(401, 403, 404, 413, 422),
    openapi_extra={"requestBody": {"required": True, "content": {BINARY: {
        "schema": {"type": "string", "format": "binary"}}}}},
)
async def upload_state(name: LayerName, request: Request, engine: EngineDep) -> Response:
    """Replace a layer's state with a safetensors file holding its keys."""
    engine.kind_of(name)  # 404 before the body is read
    body = bytes(await read_body(request))
    return await run_in_threadpool(lambda: _entry(engine.upload_state(name, body)))
