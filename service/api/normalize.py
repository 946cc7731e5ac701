"""POST /normalize: one tensor through one layer, in eval or train mode."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from ..codec import ENCODINGS, CodecError, decode_tensor, dumps, encode_tensor, parse_json
from ..engine import MODES, Outcome
from ..metrics import label
from ..schemas import NormalizeRequest, NormalizeResponse, errors, json_body
from .deps import authorize_read, authorize_write, normalize_tensor, read_body

router = APIRouter(tags=["normalize"])


def _field(payload: dict, name: str, default: str | None, allowed=None) -> str | None:
    value = payload.get(name, default)
    if value is None:
        return None
    if not isinstance(value, str) or (allowed and value not in allowed):
        expected = " or ".join(repr(a) for a in allowed) if allowed else "a string"
        raise CodecError(f"{name} must be {expected}")
    return value


def encode_outcome(layer: str, mode: str, outcome: Outcome, encoding: str) -> dict:
    body = {
        "layer": layer,
        "mode": mode,
        "output": encode_tensor(outcome.output, encoding),
        "batch_stats": {k: encode_tensor(v, encoding) for k, v in outcome.stats.items()},
    }
    if mode == "train":
        body["num_batches_tracked"] = outcome.num_batches_tracked
    return body


@router.post(
    "/normalize",
    summary="Normalize a tensor with a served layer",
    response_model=NormalizeResponse,
    responses=errors(400, 401, 403, 404, 409, 413, 422, 503),
    openapi_extra=json_body(NormalizeRequest),
)
async def normalize(request: Request) -> Response:
    """Eval mode normalizes with the running statistics and changes nothing; train mode
    normalizes with the batch statistics and folds them into the running statistics
    (needs the bearer token when one is set). Both return the batch statistics."""
    engine = request.app.state.engine
    payload = parse_json(await read_body(request))
    if not isinstance(payload, dict):
        raise CodecError("body must be a JSON object")
    layer = _field(payload, "layer", None)
    if layer is None:
        raise CodecError("layer is required")
    mode = _field(payload, "mode", "eval", MODES)
    encoding = _field(payload, "output_encoding", None, ENCODINGS)
    request_id = _field(payload, "request_id", None)
    if request_id is not None and not 0 < len(request_id) <= 128:
        raise CodecError("request_id must be 1 to 128 characters")
    # The token before the layer: without it, a 404 would tell which names exist.
    if mode == "train":
        authorize_write(request)
    else:
        authorize_read(request)
    engine.store.slot(layer)  # 404 before the tensor is looked at
    label(request.scope, "layer", layer)
    label(request.scope, "mode", mode)
    x, given_encoding = decode_tensor(payload.get("tensor"), request.app.state.limits)
    outcome = await normalize_tensor(request, layer, x, mode, request_id)
    body = encode_outcome(layer, mode, outcome, encoding or given_encoding)
    return Response(dumps(body), media_type="application/json")
