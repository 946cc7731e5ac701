"""KServe V2 (Open Inference Protocol) over REST: every served layer is a model.

    GET  /v2                                        server metadata
    GET  /v2/health/live, /v2/health/ready          200, or 503 while starting
    GET  /v2/models/{name}[/versions/{v}]           model metadata
    GET  /v2/models/{name}[/versions/{v}]/ready     200, 404 for an unknown or unloaded model
    POST /v2/models/{name}[/versions/{v}]/infer     one tensor through the layer

A model's one version changes when its layer is replaced (``v2_types``); the repository,
configuration and statistics extensions are in ``v2_repository``.

Infer runs ``Engine.normalize`` like ``POST /normalize``, with the same token rules: the
request-level parameter ``mode`` (eval or train) and ``request_id`` (idempotency key).
Errors are ``{"error": "..."}``, never compressed: 404 for an unknown model or version,
400 for any other mistake in the request.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Request
from fastapi.routing import APIRoute
from starlette.responses import Response

from ... import __version__
from ...core.errors import NotReadyError
from ...wire import compression, v2_types
from ...wire import v2 as codec
from ..deps import (
    ReadAccess,
    authorize_early,
    authorize_mode,
    normalize_tensor,
    off_loop,
    one_big_json_at_a_time,
    read_body,
)
from ..errors import reply_to
from ..metrics import label
from ..responses import BINARY, BuffersResponse, json_response
from ..schemas import errors
from ..v2_schemas import (
    InferenceRequest,
    InferenceResponse,
    MetadataModel,
    MetadataServer,
    inline_schema,
)


def answer_as_v2(handle: Callable[[Request], Coroutine[Any, Any, Response]]):
    """Wrap a handler so its errors are answered the way the protocol does
    (``service.http.errors``, V2 column)."""

    async def handle_v2(request: Request) -> Response:
        try:
            return await handle(request)
        except Exception as exc:
            return reply_to(request, exc, "v2")

    return handle_v2


class V2Route(APIRoute):
    """Routes whose errors follow the protocol (``answer_as_v2``)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        return answer_as_v2(super().get_route_handler())


router = APIRouter(prefix="/v2", tags=["v2"], route_class=V2Route)

_INFER_DOC = {
    "response_model": InferenceResponse,
    "responses": {200: {"content": {BINARY: {}}}, **errors(400, 401, 403, 404, 413, 503)},
    "openapi_extra": {"requestBody": {"required": True, "content": {
        "application/json": {"schema": inline_schema(InferenceRequest)},
        BINARY: {"schema": {"type": "string", "format": "binary"}, "description": (
            "The JSON request (length in the Inference-Header-Content-Length header), then "
            "the input's bytes: little-endian, row-major.")},
    }}},
}


# --- health and metadata ----------------------------------------------------------------


@router.get("/health/live", summary="V2 live")
def live() -> Response:
    return json_response({"live": True})


@router.get("/health/ready", summary="V2 ready", responses=errors(503))
def ready(request: Request) -> Response:
    if not request.app.state.ready:
        raise NotReadyError
    return json_response({"ready": True})


@router.get("", summary="V2 server metadata", response_model=MetadataServer)
def server_metadata() -> Response:
    return json_response(v2_types.server_metadata(__version__))


@router.get("/models/{name}", summary="V2 model metadata", response_model=MetadataModel,
            responses=errors(401, 403, 404), dependencies=[ReadAccess])
def model_metadata(name: str, request: Request) -> Response:
    """Inputs and outputs of a layer, with datatype and shape (-1: free dims)."""
    info = request.app.state.engine.layer_info(name)
    return json_response(v2_types.model_metadata(name, info.kind, info.config, info.version))


@router.get("/models/{name}/versions/{version}", summary="V2 model version metadata",
            response_model=MetadataModel, responses=errors(401, 403, 404),
            dependencies=[ReadAccess])
def model_version_metadata(name: str, version: str, request: Request) -> Response:
    v2_types.check_version(name, version, request.app.state.engine.layer_info(name).version)
    return model_metadata(name, request)


@router.get("/models/{name}/ready", summary="V2 model ready", responses=errors(401, 403, 404),
            dependencies=[ReadAccess])
def model_ready(name: str, request: Request) -> Response:
    request.app.state.engine.served(name)
    return json_response({"name": name, "ready": True})


@router.get("/models/{name}/versions/{version}/ready", summary="V2 model version ready",
            responses=errors(401, 403, 404), dependencies=[ReadAccess])
def model_version_ready(name: str, version: str, request: Request) -> Response:
    _, current = request.app.state.engine.served(name)
    v2_types.check_version(name, version, current)
    return model_ready(name, request)


# --- infer ------------------------------------------------------------------------------


@router.post("/models/{name}/infer", summary="V2 infer", **_INFER_DOC)
async def infer(name: str, request: Request) -> Response:
    """Normalize the input tensor in eval or train mode (``parameters.mode``). Outputs:
    ``output`` by default; ``batch_mean``/``batch_var`` (RMSNorm: ``batch_mean_square``)
    when asked for, and, in eval mode, ``drift`` (the batch's drift score, shape [1]) when
    asked for. JSON or binary tensors, gzip/deflate either way."""
    return await _infer(name, request)


async def _infer(name: str, request: Request, version: str | None = None) -> Response:
    engine = request.app.state.engine
    # Before the lookup (with reads protected, a 404 names layers) and the body.
    authorize_early(request)
    kind, current = engine.served(name)  # 404 before the body is read
    if version is not None:
        v2_types.check_version(name, version, current)
    label(request.scope, "layer", name)
    body = await read_body(request)
    header_value = request.headers.get("inference-header-content-length")
    limits = request.app.state.limits
    async with one_big_json_at_a_time(request, codec.header_length(header_value, len(body))):
        parsed = await off_loop(len(body), codec.decode_infer_request, body, header_value,
                                v2_types.output_names(kind), limits)
        label(request.scope, "mode", parsed.mode)
        authorize_mode(request, parsed.mode)
        x = await off_loop(len(body), codec.decode_input, parsed, body, limits)
    outcome = await normalize_tensor(request, name, x, parsed.mode, parsed.request_id)
    head, blobs = await off_loop(outcome.output.numel(), codec.encode_infer_response, name,
                                 parsed, outcome.output, outcome.stats,
                                 outcome.num_batches_tracked, current, outcome.drift)
    return await _send(request, head, blobs)


# The hot path, served without FastAPI's dependency machinery (see service/app.py).
infer_directly = answer_as_v2(lambda request: infer(request.path_params["name"], request))


@router.post("/models/{name}/versions/{version}/infer", summary="V2 infer (version)",
             **_INFER_DOC)
async def infer_version(name: str, version: str, request: Request) -> Response:
    return await _infer(name, request, version)


async def _send(request: Request, head: bytes, blobs: list) -> Response:
    # NOTE: the header must be sent (once) whenever a blob follows, or tritonclient parses
    # the whole body as JSON; its value is the uncompressed JSON length.
    headers = {"Inference-Header-Content-Length": str(len(head))} if blobs else {}
    parts = [head, *blobs]
    encoding = compression.response_encoding(request.headers.get("accept-encoding"))
    if encoding is not None:
        size = sum(len(p) for p in parts)
        packed = await off_loop(size, compression.compress_if_it_pays, parts, encoding)
        if packed is not None:
            parts = [packed]
            headers["Content-Encoding"] = encoding
    return BuffersResponse(parts, headers, BINARY if blobs else "application/json")
