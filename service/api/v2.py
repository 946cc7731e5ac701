"""KServe V2 (Open Inference Protocol) over REST: every served layer is a model.

    GET  /v2                                        server metadata
    GET  /v2/health/live, /v2/health/ready          200, or 503 while starting
    GET  /v2/models/{name}[/versions/1]             model metadata
    GET  /v2/models/{name}[/versions/1]/ready       200, 404 for an unknown model
    POST /v2/models/{name}[/versions/1]/infer       one tensor through the layer

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
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .. import __version__
from ..codec import CodecError, dumps
from ..engine import MODES
from ..errors import error_response, status_of
from ..metrics import label
from ..schemas import errors
from ..store import LayerNotFoundError
from ..v2 import codec, types
from ..v2.schemas import (
    InferenceRequest,
    InferenceResponse,
    MetadataModel,
    MetadataServer,
    inline_schema,
)
from .deps import ReadAccess, authorize_read, authorize_write, normalize_tensor, read_body


def answer_as_v2(handle: Callable[[Request], Coroutine[Any, Any, Response]]):
    """Wrap a handler so its errors are answered the way the protocol does.

    NOTE: V2 clients expect 400 for every mistake in a request, where the rest of the API
    says 422, and tritonclient shows the message only from an ``{"error"}`` body.
    """

    async def handle_v2(request: Request) -> Response:
        try:
            return await handle(request)
        except HTTPException:
            raise  # 401/403 from the token check: already {"error"}
        except Exception as exc:
            status = status_of(exc)
            if status == 500:
                raise  # logged by the app's handler
            if isinstance(exc, LayerNotFoundError):
                return error_response(404, f"unknown model {exc.name!r}")
            return error_response(400 if status == 422 else status, str(exc))

    return handle_v2


class V2Route(APIRoute):
    """Routes whose errors follow the protocol (``answer_as_v2``)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        return answer_as_v2(super().get_route_handler())


class BuffersResponse(Response):
    """A body sent as several buffers, so tensor bytes go out as they are instead of
    being joined (copied) into one bytes object first."""

    def __init__(self, parts: list, headers: dict[str, str], media_type: str) -> None:
        self.parts = parts
        size = str(sum(len(p) for p in parts))
        super().__init__(None, 200, {**headers, "content-length": size}, media_type)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        last = len(self.parts) - 1
        for i, part in enumerate(self.parts):
            await send({"type": "http.response.body", "body": part, "more_body": i < last})


router = APIRouter(prefix="/v2", tags=["v2"], route_class=V2Route)

_BINARY = "application/octet-stream"
_INFER_DOC = {
    "response_model": InferenceResponse,
    "responses": {200: {"content": {_BINARY: {}}}, **errors(400, 401, 403, 404, 413, 503)},
    "openapi_extra": {"requestBody": {"required": True, "content": {
        "application/json": {"schema": inline_schema(InferenceRequest)},
        _BINARY: {"schema": {"type": "string", "format": "binary"}, "description": (
            "The JSON request (length in the Inference-Header-Content-Length header), then "
            "the input's bytes: little-endian, row-major.")},
    }}},
}


def _json(obj: object) -> Response:
    return Response(dumps(obj), media_type="application/json")


# --- health and metadata ----------------------------------------------------------------


@router.get("/health/live", summary="V2 live")
def live() -> Response:
    return _json({"live": True})


@router.get("/health/ready", summary="V2 ready", responses=errors(503))
def ready(request: Request) -> Response:
    if not request.app.state.ready:
        return error_response(503, "starting: catalog not loaded yet")
    return _json({"ready": True})


@router.get("", summary="V2 server metadata", response_model=MetadataServer)
def server_metadata() -> Response:
    return _json(types.server_metadata(__version__))


@router.get("/models/{name}", summary="V2 model metadata", response_model=MetadataModel,
            responses=errors(401, 403, 404), dependencies=[ReadAccess])
def model_metadata(name: str, request: Request) -> Response:
    """Inputs and outputs of a layer, with datatype and shape (-1: free dims)."""
    entry = request.app.state.engine.layer_entry(name)
    return _json(types.model_metadata(name, entry["kind"], entry["config"]))


@router.get("/models/{name}/versions/{version}", summary="V2 model version metadata",
            response_model=MetadataModel, responses=errors(401, 403, 404),
            dependencies=[ReadAccess])
def model_version_metadata(name: str, version: str, request: Request) -> Response:
    types.check_version(name, version)
    return model_metadata(name, request)


@router.get("/models/{name}/ready", summary="V2 model ready", responses=errors(401, 403, 404),
            dependencies=[ReadAccess])
def model_ready(name: str, request: Request) -> Response:
    request.app.state.engine.store.slot(name)
    return _json({"name": name, "ready": True})


@router.get("/models/{name}/versions/{version}/ready", summary="V2 model version ready",
            responses=errors(401, 403, 404), dependencies=[ReadAccess])
def model_version_ready(name: str, version: str, request: Request) -> Response:
    types.check_version(name, version)
    return model_ready(name, request)


# --- infer ------------------------------------------------------------------------------


@router.post("/models/{name}/infer", summary="V2 infer", **_INFER_DOC)
async def infer(name: str, request: Request) -> Response:
    """Normalize the input tensor in eval or train mode (``parameters.mode``). Outputs:
    ``output`` by default; ``batch_mean``/``batch_var`` (RMSNorm: ``batch_mean_square``)
    when asked for. JSON or binary tensors, gzip/deflate either way."""
    engine = request.app.state.engine
    authorize_read(request)  # before the lookup: with reads protected, a 404 names layers
    kind = engine.store.slot(name).spec.kind  # 404 before the body is read
    label(request.scope, "layer", name)
    body, parsed = await _read_request(request, types.output_names(kind))
    _authorize(request, parsed.mode)
    x = codec.decode_input(parsed, body, request.app.state.limits)
    outcome = await normalize_tensor(request, name, x, parsed.mode, parsed.request_id)
    head, blobs = codec.encode_infer_response(name, parsed, outcome.output, outcome.stats,
                                              outcome.num_batches_tracked)
    return await _send(request, head, blobs)


# The hot path, served without FastAPI's dependency machinery (see service/app.py).
infer_directly = answer_as_v2(lambda request: infer(request.path_params["name"], request))


@router.post("/models/{name}/versions/{version}/infer", summary="V2 infer (version)",
             **_INFER_DOC)
async def infer_version(name: str, version: str, request: Request) -> Response:
    types.check_version(name, version)
    return await infer(name, request)


async def _read_request(
    request: Request, outputs: tuple[str, ...]
) -> tuple[bytearray, codec.InferRequest]:
    """The (decompressed) body, and its JSON header checked."""
    body = await read_body(request)
    encoding = request.headers.get("content-encoding")
    if encoding:
        body = await run_in_threadpool(codec.decompress, body, encoding,
                                       request.app.state.settings.max_body_bytes)
    header_length = request.headers.get("inference-header-content-length")
    return body, codec.decode_infer_request(body, header_length, outputs)


def _authorize(request: Request, mode: str) -> None:
    """Train needs write access, eval read access, as on POST /normalize."""
    if mode not in MODES:
        raise CodecError("parameter mode must be 'eval' or 'train'")
    label(request.scope, "mode", mode)
    if mode == "train":
        authorize_write(request)
    else:
        authorize_read(request)


async def _send(request: Request, head: bytes, blobs: list) -> Response:
    # NOTE: the header must be sent (once) whenever a blob follows, or tritonclient parses
    # the whole body as JSON; its value is the uncompressed JSON length.
    headers = {"Inference-Header-Content-Length": str(len(head))} if blobs else {}
    parts = [head, *blobs]
    encoding = codec.response_encoding(request.headers.get("accept-encoding"))
    if encoding is not None:
        parts = [await run_in_threadpool(codec.compress, parts, encoding)]
        headers["Content-Encoding"] = encoding
    return BuffersResponse(parts, headers, _BINARY if blobs else "application/json")
