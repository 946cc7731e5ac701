"""One place that turns exceptions into HTTP status codes and ``{"error": "..."}`` bodies.

Messages name the problem and never echo the request payload back.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

from normcore.errors import CheckpointError, InputError

from .codec import CodecError, dumps
from .engine import RequestError
from .store import LayerNotFoundError

log = logging.getLogger("normcore.service")


class BodyTooLargeError(Exception):
    """The request body is over the configured limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body exceeds the limit of {limit} bytes")


class UnavailableError(Exception):
    """The server cannot take this kind of request now (e.g. its journal failed)."""


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(dumps({"error": message}), status, headers, media_type="application/json")


def status_of(exc: Exception) -> int:
    """The HTTP status for an exception raised while serving a request."""
    if isinstance(exc, LayerNotFoundError):
        return 404
    if isinstance(exc, CodecError | RequestError):
        return exc.status
    if isinstance(exc, InputError | CheckpointError):
        return 422
    if isinstance(exc, BodyTooLargeError):
        return 413
    if isinstance(exc, UnavailableError):
        return 503
    return 500


def _handle(request: Request, exc: Exception) -> Response:
    status = status_of(exc)
    if status == 500:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal server error")
    return error_response(status, str(exc))


def _http(request: Request, exc: HTTPException) -> Response:
    message = exc.detail if isinstance(exc.detail, str) else "request failed"
    return error_response(exc.status_code, message, getattr(exc, "headers", None))


def _validation(request: Request, exc: RequestValidationError) -> Response:
    # FastAPI's default handler echoes the offending input (and fails on NaN): name the
    # fields and what is wrong with them instead.
    problems = [
        f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', 'invalid')}"
        for err in exc.errors()[:5]
    ]
    return error_response(422, "; ".join(problems) or "invalid request")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(HTTPException, _http)
    app.add_exception_handler(RequestValidationError, _validation)
    for exc_type in (LayerNotFoundError, CodecError, RequestError, InputError, CheckpointError,
                     BodyTooLargeError, UnavailableError, Exception):
        app.add_exception_handler(exc_type, _handle)
