"""Reply bodies: JSON objects, and tensors sent as several buffers without a join."""

from __future__ import annotations

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ..wire.tensors import dumps

JSON = "application/json"
BINARY = "application/octet-stream"


def json_response(obj: object, status: int = 200) -> Response:
    """``obj`` as JSON (numpy arrays inside are written natively)."""
    return Response(dumps(obj), status, media_type=JSON)


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
