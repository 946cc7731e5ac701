"""A server span for every HTTP request (``service.tracing``), named by method and route
template, with the status, the request id, and the layer and mode where there are any. The
app adds it only when tracing is on."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import tracing


class TracingMiddleware:
    """Pure ASGI; inside the request-id middleware, so the id is known."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        carrier = {name.decode("latin-1"): value.decode("latin-1")
                   for name, value in scope["headers"]}
        method = scope["method"]
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        state = scope.setdefault("state", {})
        # Named "METHOD /route/{template}" once routed (never by the raw path).
        with tracing.server_span(method, carrier, **{
            "http.request.method": method, "url.path": scope["path"],
            "normcore.request_id": state.get("request_id", ""),
        }) as span:
            try:
                await self.app(scope, receive, send_with_status)
            finally:
                route = getattr(scope.get("route"), "path", None)
                if route is not None:
                    span.update_name(f"{method} {route}")
                    span.set_attribute("http.route", route)
                span.set_attribute("http.response.status_code", status)
                for key in ("layer", "mode"):
                    if state.get(f"metrics_{key}"):
                        span.set_attribute(f"normcore.{key}", state[f"metrics_{key}"])
                if status >= 500:
                    tracing.mark_error(span, str(status))
