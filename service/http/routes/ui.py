"""GET /ui: a page of plots of every layer's statistics and drift, served by the service
itself, with every asset in the package (no CDN, no external fonts).

The page and its assets hold no data, so they need no token. The page polls ``/stats``;
when reads are protected (``/ui/config.json`` says so) it asks for the token first and
sends it as a bearer header, keeping it in the tab's sessionStorage only.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter, Request
from starlette.responses import Response

from ...core.errors import NotFoundError
from ...wire.tensors import dumps
from ..responses import JSON

router = APIRouter(tags=["ui"])

# Milliseconds between two polls of /stats.
REFRESH_MS = 1000
_TYPES = {
    "ui.js": "text/javascript; charset=utf-8",
    "ui.css": "text/css; charset=utf-8",
    "plots.js": "text/javascript; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
# Only the page's own files run or load; nothing inline, nothing from elsewhere.
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@cache
def _read(name: str) -> bytes:
    return (resources.files("service.http") / "ui" / name).read_bytes()


@router.get("/ui", summary="Statistics page", response_class=Response,
            responses={200: {"content": {"text/html": {}}}})
def page() -> Response:
    """Every layer's running mean and variance per channel, its drift score over time,
    request counts and last update, refreshed live. Open it in a browser."""
    return Response(_read("index.html"), media_type="text/html; charset=utf-8",
                    headers=_HEADERS)


@router.get("/ui/config.json", include_in_schema=False)
def config(request: Request) -> Response:
    """What the page needs before it asks for data: whether it must ask for a token."""
    settings = request.app.state.settings
    body = {"protect_reads": settings.protect_reads, "refresh_ms": REFRESH_MS}
    return Response(dumps(body), media_type=JSON, headers=_HEADERS)


@router.get("/ui/{asset}", include_in_schema=False)
def asset(asset: str) -> Response:
    if asset not in _TYPES:
        raise NotFoundError("no such file")
    return Response(_read(asset), media_type=_TYPES[asset], headers=_HEADERS)
