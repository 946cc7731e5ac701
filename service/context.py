"""What a request carries through every layer without being passed along: its id.

The transports (``service.http.request_id``, the gRPC server) set it when a request
arrives; logs and traces read it. A context variable, so it follows the request into the
thread pool (anyio and ``asyncio.to_thread`` copy the context) and never leaks into another
request.
"""

from __future__ import annotations

import re
import uuid
from contextvars import ContextVar

# The id of the request being served, or None outside a request.
REQUEST_ID: ContextVar[str | None] = ContextVar("normcore_request_id", default=None)

# An id a client may choose: 1 to 128 visible ASCII characters, nothing that could break a
# log line or a header. Anything else is replaced by a new id.
_CLIENT_ID = re.compile(r"[\x21-\x7e]{1,128}\Z")


def request_id_from(value: str | bytes | None) -> str:
    """The client's id when it is fit to repeat, else a new one (a UUID)."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if value is not None and _CLIENT_ID.match(value):
        return value
    return str(uuid.uuid4())
