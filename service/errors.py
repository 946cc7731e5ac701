"""One place that turns exceptions into HTTP status codes and ``{"error": "..."}`` bodies.

Messages name the problem and never echo the request payload back: a client-given name
is repeated only when it is a plain layer name, and every message is bounded in length.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from normcore.errors import CheckpointError, InputError

from .catalog import NAME
from .codec import CodecError, dumps
from .engine import RequestError
from .store import LayerNotFoundError

log = logging.getLogger("normcore.service")

MAX_MESSAGE = 500  # characters; longer messages are cut (a backstop against echoing input)


class BodyTooLargeError(HTTPException):
    """The request body is over the configured limit (413).

    An HTTPException, so that FastAPI's own body parsing lets it through as it is
    instead of turning it into a 400.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds the limit of {limit} bytes")


class UnavailableError(Exception):
    """The server cannot take this kind of request now (e.g. its journal failed)."""


class RequestTimeoutError(UnavailableError):
    """The computation for a request did not finish within the request timeout."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"the request did not finish within {seconds:g} s; a train step "
                         "that was already running may still be applied")


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    if len(message) > MAX_MESSAGE:
        message = message[: MAX_MESSAGE - 3] + "..."
    return Response(dumps({"error": message}), status, headers, media_type="application/json")


def status_of(exc: Exception) -> int:
    """The HTTP status for an exception raised while serving a request."""
    if isinstance(exc, LayerNotFoundError):
        return 404
    if isinstance(exc, CodecError | RequestError):
        return exc.status
    if isinstance(exc, InputError | CheckpointError):
        return 422
    if isinstance(exc, HTTPException):
        return exc.status_code
    if isinstance(exc, ClientDisconnect):
        return 400  # nobody reads it: the client is gone
    if isinstance(exc, UnavailableError):
        return 503
    return 500


def message_of(exc: Exception) -> str:
    """What the client is told: the exception's words, minus any name it should not echo."""
    if isinstance(exc, LayerNotFoundError) and not NAME.match(str(exc.name)):
        return "unknown layer (names match [A-Za-z0-9._-]{1,128})"
    return str(exc)


def _handle(request: Request, exc: Exception) -> Response:
    status = status_of(exc)
    if status == 500:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal server error")
    return error_response(status, message_of(exc))


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
                     UnavailableError, ClientDisconnect, Exception):
        app.add_exception_handler(exc_type, _handle)
