"""POST /normalize: one tensor through one layer, in eval or train mode."""

from __future__ import annotations

from dataclasses import replace

from fastapi import APIRouter, Request
from starlette.responses import Response

from ...wire.normalize import decode_normalize_request, encode_normalize_response
from ...wire.tensors import check_json_output, decode_tensor
from ..deps import (
    authorize_early,
    authorize_mode,
    normalize_tensor,
    off_loop,
    one_big_json_at_a_time,
    read_body,
)
from ..metrics import label
from ..responses import json_response
from ..schemas import NormalizeRequest, NormalizeResponse, errors, json_body

router = APIRouter(tags=["normalize"])


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
    (needs the bearer token when one is set). Both return the batch statistics; eval also
    its drift score against the running statistics (or an average of past inputs)."""
    engine = request.app.state.engine
    authorize_early(request)  # a stranger is refused before the body is read
    body = await read_body(request)
    limits = request.app.state.limits
    async with one_big_json_at_a_time(request, len(body)):
        call = await off_loop(len(body), decode_normalize_request, body, limits)
        # The token before the layer: without it, a 404 would tell which names exist.
        authorize_mode(request, call.mode)
        engine.served(call.layer)  # 404 before the tensor is looked at
        label(request.scope, "layer", call.layer)
        label(request.scope, "mode", call.mode)
        x, given_encoding = await off_loop(len(body), decode_tensor, call.tensor, limits)
        call = replace(call, tensor=None)  # let the parsed values go: x replaces them
    encoding = call.output_encoding or given_encoding
    if encoding == "list" and given_encoding == "b64":
        check_json_output(x.numel(), x.dtype, limits, "ask for output_encoding b64")
    outcome = await normalize_tensor(request, call.layer, x, call.mode, call.request_id)
    return await off_loop(outcome.output.numel(), _reply, call, outcome, encoding)


def _reply(call, outcome, encoding: str) -> Response:
    return json_response(encode_normalize_response(call.layer, call.mode, outcome, encoding))
