"""X-Request-ID: every request has an id, the client's own when it sends a usable one
(``service.context.request_id_from``), a new one otherwise. The id is set for the request's
logs and traces (``service.context.REQUEST_ID``, ``scope["state"]["request_id"]``) and
echoed in the reply's ``X-Request-ID`` header, errors included."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..context import REQUEST_ID, request_id_from

HEADER = b"x-request-id"


class RequestIdMiddleware:
    """Pure ASGI, outermost: the id is known to everything that runs inside it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = next((value for name, value in scope["headers"] if name == HEADER), None)
        request_id = request_id_from(sent)
        scope.setdefault("state", {})["request_id"] = request_id
        echoed = (HEADER, request_id.encode("ascii"))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), echoed]
            await send(message)

        token = REQUEST_ID.set(request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)
