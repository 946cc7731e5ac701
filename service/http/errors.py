"""The one place that turns exceptions into statuses: HTTP replies for REST and V2, and
gRPC status codes for V2 over gRPC.

Every HTTP error is ``{"error": "..."}``. The two protocols differ only in the status of an
invalid request: REST says 422, V2 says 400 (V2 clients expect 400 for every mistake in a
request, and tritonclient shows the message only from an ``{"error"}`` body). gRPC gets the
V2 message with the code of the table's last column (named as ``grpc.StatusCode`` names
them: this module does not load grpc). Messages are the exceptions' own words, which never
echo raw client input, and are bounded in length.
"""

from __future__ import annotations

import logging
import traceback
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from normcore.errors import CheckpointError, InputError

from ..core.errors import (
    ConflictError,
    InvalidRequestError,
    InvalidTokenError,
    LayerNotFoundError,
    MalformedRequestError,
    MissingTokenError,
    NotFoundError,
    PayloadTooLargeError,
    UnavailableError,
)
from ..wire.tensors import dumps

log = logging.getLogger("normcore.service")

Protocol = Literal["rest", "v2"]
MAX_MESSAGE = 500  # characters; longer messages are cut (a backstop against echoing input)

# (exception, REST status, V2 status, gRPC status); the first row that matches wins, so
# subclasses come before their bases.
STATUS: list[tuple[type[BaseException], int, int, str]] = [
    (MalformedRequestError, 400, 400, "INVALID_ARGUMENT"),
    (InvalidRequestError, 422, 400, "INVALID_ARGUMENT"),
    (InputError, 422, 400, "INVALID_ARGUMENT"),  # a tensor the layer cannot take
    (CheckpointError, 422, 400, "INVALID_ARGUMENT"),  # an unusable uploaded checkpoint
    (NotFoundError, 404, 404, "NOT_FOUND"),
    (ConflictError, 409, 409, "ALREADY_EXISTS"),
    (PayloadTooLargeError, 413, 413, "RESOURCE_EXHAUSTED"),
    (MissingTokenError, 401, 401, "UNAUTHENTICATED"),
    (InvalidTokenError, 403, 403, "PERMISSION_DENIED"),
    (UnavailableError, 503, 503, "UNAVAILABLE"),
    (ClientDisconnect, 400, 400, "CANCELLED"),  # nobody reads it: the client is gone
]
GRPC_INTERNAL = "INTERNAL"
_HEADERS = {MissingTokenError: {"WWW-Authenticate": "Bearer"}}


def status_of(exc: BaseException, protocol: Protocol = "rest") -> int:
    """The HTTP status for an exception raised while serving a request (500: a bug)."""
    for kind, rest, v2, _ in STATUS:
        if isinstance(exc, kind):
            return rest if protocol == "rest" else v2
    if isinstance(exc, HTTPException):  # routing: unknown path, method not allowed
        return exc.status_code
    return 500


def grpc_status_of(exc: BaseException) -> tuple[str, str]:
    """(gRPC status code name, message) for an exception raised while serving an RPC;
    anything unexpected is logged and told as INTERNAL."""
    for kind, _, _, code in STATUS:
        if isinstance(exc, kind):
            return code, _bounded(message_of(exc, "v2"))
    log.error("unhandled error in a gRPC call", exc_info=exc)
    return GRPC_INTERNAL, "internal server error"


def _bounded(message: str) -> str:
    return message if len(message) <= MAX_MESSAGE else message[: MAX_MESSAGE - 3] + "..."


def message_of(exc: BaseException, protocol: Protocol = "rest") -> str:
    if protocol == "v2" and isinstance(exc, LayerNotFoundError):
        return str(exc).replace("unknown layer", "unknown model", 1)
    if isinstance(exc, HTTPException):
        return exc.detail if isinstance(exc.detail, str) else "request failed"
    return str(exc)


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(dumps({"error": _bounded(message)}), status, headers,
                    media_type="application/json")


def reply_to(request: Request | None, exc: BaseException,
             protocol: Protocol = "rest") -> Response:
    """The error reply for ``exc``; anything unexpected is logged and told as a 500."""
    status = status_of(exc, protocol)
    if status == 500:
        where = f"{request.method} {request.url.path}" if request is not None else "a request"
        log.error("unhandled error on %s", where, exc_info=exc)
        response = error_response(500, "internal server error")
    else:
        headers = _HEADERS.get(type(exc)) or getattr(exc, "headers", None)
        response = error_response(status, message_of(exc, protocol), headers)
    _let_go(exc)
    return response


def _let_go(exc: BaseException | None) -> None:
    """Clear the finished frames of ``exc``'s traceback (and of the exceptions it chains):
    a refused request's body, up to max_body_bytes, sits in their locals. The future that
    carried the exception from a worker thread closes a cycle through them, which only
    a garbage collection breaks, and the service collects rarely (service.app): forty
    refused 64 MB bodies held 3 GB."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if exc.__traceback__ is not None:
            # Not the first frame, where the exception is handled: a coroutine that may be
            # suspended, waiting for this very reply (clearing it would close it). The
            # frames the exception left are done.
            traceback.clear_frames(exc.__traceback__.tb_next)
        exc = exc.__cause__ or exc.__context__


def _validation(request: Request, exc: RequestValidationError) -> Response:
    # FastAPI's default handler echoes the offending input (and fails on NaN): name the
    # fields and what is wrong with them instead.
    problems = [
        f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', 'invalid')}"
        for err in exc.errors()[:5]
    ]
    return error_response(422, "; ".join(problems) or "invalid request")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation)
    # The known kinds by class, so they are answered inside the app; Exception last, which
    # Starlette answers (500) from its outermost middleware.
    for exc_type in (*(row[0] for row in STATUS), HTTPException, Exception):
        app.add_exception_handler(exc_type, reply_to)
