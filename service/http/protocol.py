"""The HTTP/1.1 protocol the server runs: uvicorn's httptools protocol with deadlines.

Plain uvicorn waits forever for a request that arrives a byte at a time, so a few slow
clients can hold connections (and file descriptors) indefinitely. Here every request -
request line, headers and body - must arrive within ``client_timeout`` seconds of its
first byte (of the connection, for the first request); otherwise the client gets a 408
if no response has started, and the connection is closed. The clock stops once the
request is complete: the compute has its own deadline (``request_timeout``), and idle time
between requests is uvicorn's keep-alive timeout. The request line and headers together
are also capped (431), since httptools itself does not limit them.

Replies have a deadline too, on progress: a client that stops reading holds its whole
reply in the server's memory (a tiny request can ask for tens of MB), and uvicorn never
gives up on it. Once a reply fills the socket's buffers, the client must take 64 KB of it
(or the rest) every ``client_timeout`` seconds, or the connection is dropped; a slow
reader that keeps reading at that pace is never cut off.

Errors are JSON ``{"error": ...}`` like every other answer of the service, including
uvicorn's own reply to a request it cannot parse.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import socket
import struct
import termios

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from ..wire.tensors import dumps

log = logging.getLogger("normcore.service")

MAX_HEAD_BYTES = 64 * 1024  # request line plus headers
MIN_REPLY_PROGRESS = 64 * 1024  # bytes of a backed-up reply taken per client_timeout


class _HeadTooLargeError(Exception):
    """Raised inside a parser callback to stop parsing a request whose head is too big."""


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """httptools' protocol with a per-request deadline and a cap on the request head."""

    client_timeout: float = 10.0

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._reply_watch: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self._head_too_large = False

    # --- the deadline -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()  # the first request's clock starts with the connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._unwatch_reply()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        self._arm()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.client_timeout, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        log.info("closing the connection from %s: request not received within %g s",
                 _peer(self.client), self.client_timeout)
        # A response already under way (the app answered before the body ended) is cut
        # short; otherwise the client is told why.
        if self.cycle is None or self.cycle.response_complete or not self.cycle.response_started:
            self._refuse(408, f"request not received within {self.client_timeout:g} s")
        else:
            self.transport.close()

    # --- the reply's progress -----------------------------------------------------------

    def pause_writing(self) -> None:  # the transport's buffer is full: the client lags
        super().pause_writing()
        self._watch_reply(self._unsent())

    def resume_writing(self) -> None:
        self._unwatch_reply()
        super().resume_writing()

    def _watch_reply(self, pending: int) -> None:
        self._unwatch_reply()
        self._reply_watch = self.loop.call_later(self.client_timeout, self._reply_check,
                                                 pending)

    def _unwatch_reply(self) -> None:
        if self._reply_watch is not None:
            self._reply_watch.cancel()
            self._reply_watch = None

    def _reply_check(self, pending_before: int) -> None:
        # Also once the transport is closing (a "Connection: close" reply, all written to
        # it): close() lets the buffer drain first, for as long as that takes.
        self._reply_watch = None
        if self.transport.get_write_buffer_size() == 0:
            return
        pending = self._unsent()
        if pending_before - pending >= min(pending_before, MIN_REPLY_PROGRESS):
            # It reads, slowly: another period. (A segment now and then is not enough.)
            self._watch_reply(pending)
            return
        log.info("closing the connection to %s: reply stalled, under %d bytes taken in "
                 "%g s (%d bytes left)", _peer(self.client), MIN_REPLY_PROGRESS,
                 self.client_timeout, pending)
        # A reset, not a close: close() would wait for the buffer to drain, and the system
        # would go on sending what its send queue holds (MBs) to a client that does not read.
        with contextlib.suppress(AttributeError, OSError):
            self.transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    def _unsent(self) -> int:
        """Reply bytes the client has not taken: the transport's buffer, and the socket's
        send queue where the system tells it (Linux). The buffer alone moves in steps of
        up to half the send queue, MBs on loopback: a steady reader may not move it for a
        while."""
        pending = self.transport.get_write_buffer_size()
        sock = self.transport.get_extra_info("socket")
        with contextlib.suppress(AttributeError, OSError, ValueError):
            queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4)
            pending += struct.unpack("i", queued)[0]
        return pending

    # --- the head cap -------------------------------------------------------------------

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def _count(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > MAX_HEAD_BYTES:
            self._head_too_large = True
            raise _HeadTooLargeError  # httptools stops; uvicorn calls send_400_response

    # --- answers written straight to the socket -----------------------------------------

    def send_400_response(self, msg: str) -> None:
        if self._head_too_large:
            self._refuse(431, f"request line and headers exceed {MAX_HEAD_BYTES} bytes")
        else:
            self._refuse(400, "malformed HTTP request")

    def _refuse(self, status: int, message: str) -> None:
        self._disarm()
        body = dumps({"error": message})
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [b"content-type: application/json\r\n",
                 b"content-length: %d\r\n" % len(body), b"connection: close\r\n\r\n"]
        self.transport.write(b"".join(head) + body)
        self.transport.close()


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "unknown client"


def guarded_http_protocol(client_timeout: float) -> type[GuardedHttpToolsProtocol]:
    """The protocol class to give ``uvicorn.Config(http=...)`` for this timeout."""
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,),
                {"client_timeout": client_timeout})
