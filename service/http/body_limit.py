"""The request body limit, for every route, in front of the app (pure ASGI).

A declared ``Content-Length`` over ``max_body_bytes`` is answered 413 at once, before a
byte of the body is read; a chunked body is counted as it arrives and refused with 413 as
soon as it passes the limit. A response that goes out before its request's body was read
to the end (a 413, a 401, a route that reads no body) closes the connection, so the
server never reads the rest of a body nobody wants.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..core.errors import BodyTooLargeError
from .errors import reply_to


def declared_length(scope: Scope) -> int | None:
    """The request's Content-Length, or None when it has none (or one the server let by)."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


def has_body(scope: Scope) -> bool:
    return any(
        (name == b"content-length" and value not in (b"0", b"")) or name == b"transfer-encoding"
        for name, value in scope["headers"]
    )


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_body_bytes`` (413) without reading them."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        declared = declared_length(scope)
        if declared is not None and declared > limit:
            await _refuse(scope, receive, send, limit)
            return
        received = 0
        body_done = not has_body(scope)
        response_started = False

        async def capped_receive() -> Message:
            nonlocal received, body_done
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLargeError(limit)
                body_done = not message.get("more_body", False)
            return message

        async def closing_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
                if not body_done:
                    headers = [*message.get("headers", []), (b"connection", b"close")]
                    message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, capped_receive, closing_send)
        except BodyTooLargeError:
            # Routes answer it themselves (service.http.errors); this covers any code path that
            # lets it escape before a response started.
            if response_started:
                raise
            await _refuse(scope, receive, send, limit)


async def _refuse(scope: Scope, receive: Receive, send: Send, limit: int) -> None:
    response = reply_to(None, BodyTooLargeError(limit))
    response.headers["connection"] = "close"
    await response(scope, receive, send)
