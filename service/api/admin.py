"""Layer admin: create or replace, delete, reset, download and upload state.

Every route here changes or exposes whole layer state, so each needs the bearer token
when one is configured. Checkpoints are accepted as safetensors only.
"""

from __future__ import annotations

import binascii

from fastapi import APIRouter, Request
from pydantic import ValidationError
from starlette.responses import Response

from normcore.checkpoint import load_state_dict_bytes

from ..catalog import shown
from ..codec import CodecError, dumps, parse_json
from ..schemas import Deleted, LayerCreate, LayerEntry, errors, json_body
from .deps import EngineDep, LayerName, WriteAccess, read_body

router = APIRouter(prefix="/layers", tags=["admin"], dependencies=[WriteAccess])

_SAFETENSORS = "application/octet-stream"


def _json(obj: object) -> Response:
    return Response(dumps(obj), media_type="application/json")


@router.put(
    "/{name}", response_model=LayerEntry, responses=errors(400, 401, 403, 413, 422),
    openapi_extra=json_body(LayerCreate),
)
async def put_layer(name: LayerName, request: Request, engine: EngineDep) -> Response:
    """Create or replace a layer from its configuration and an optional safetensors
    checkpoint (base64 in ``checkpoint_b64``; ``prefix`` selects its keys)."""
    payload = parse_json(await read_body(request))
    try:
        spec = LayerCreate.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(shown(p) if isinstance(p, str) else str(p) for p in first["loc"])
        where = where or "body"
        raise CodecError(f"{where}: {first['msg']}") from None
    checkpoint = None
    if spec.checkpoint_b64 is not None:
        try:
            checkpoint = binascii.a2b_base64(spec.checkpoint_b64, strict_mode=True)
        except (binascii.Error, ValueError):
            raise CodecError("checkpoint_b64 is not valid base64") from None
    entry = engine.put_layer(name, spec.kind, spec.config, checkpoint, spec.prefix, spec.device)
    return _json(entry)


@router.delete("/{name}", response_model=Deleted, responses=errors(401, 403, 404, 422))
def delete_layer(name: LayerName, engine: EngineDep) -> Response:
    """Stop serving a layer."""
    engine.delete_layer(name)
    return _json({"deleted": name})


@router.post("/{name}/reset", response_model=LayerEntry,
             responses=errors(401, 403, 404, 422))
def reset_layer(name: LayerName, engine: EngineDep) -> Response:
    """Return a layer to its checkpoint's statistics (torch's defaults without one)."""
    return _json(engine.reset_layer(name))


@router.get(
    "/{name}/state",
    responses={200: {"content": {_SAFETENSORS: {}}}, **errors(401, 403, 404, 422)},
    response_class=Response,
)
def download_state(name: LayerName, engine: EngineDep) -> Response:
    """The layer's current state as a safetensors file (torch.nn key names)."""
    return Response(
        engine.export_layer(name), media_type=_SAFETENSORS,
        headers={"Content-Disposition": f'attachment; filename="{name}.safetensors"'},
    )


@router.put(
    "/{name}/state", response_model=LayerEntry,
    responses=errors(401, 403, 404, 413, 422),
    openapi_extra={"requestBody": {"required": True, "content": {_SAFETENSORS: {
        "schema": {"type": "string", "format": "binary"}}}}},
)
async def upload_state(name: LayerName, request: Request, engine: EngineDep) -> Response:
    """Replace a layer's state with a safetensors file holding its keys."""
    engine.store.slot(name)
    state = load_state_dict_bytes(bytes(await read_body(request)), source="uploaded state")
    return _json(engine.load_state(name, state))

