"""The real server process against a client that stops reading its reply: a small request
can ask for many MB, which the server holds until the client takes them. A client that
takes none of it for ``client_timeout`` seconds is dropped; one that reads slowly is not."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import numpy as np
import pytest

from tests.server_process import ServerProcess, service_process

pytestmark = pytest.mark.slow

CLIENT_TIMEOUT = 1.0
SLACK = 1.5  # a loaded 2-core box


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    env = {"NORMCORE_CLIENT_TIMEOUT": str(CLIENT_TIMEOUT), "NORMCORE_THREADS": "1"}
    with service_process(env=env) as proc:
        yield proc


def _binary_infer(rows: int) -> tuple[bytes, int]:
    """A V2 infer of [rows, 64] float32 zeros on stream.bn with a binary output: the
    request, and the size of the output it asks for."""
    x = np.zeros((rows, 64), dtype="<f4")
    header = json.dumps({
        "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes}}],
        "outputs": [{"name": "output", "parameters": {"binary_data": True}}],
    }).encode()
    body = header + x.tobytes()
    head = (b"POST /v2/models/stream.bn/infer HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/octet-stream\r\n"
            b"Inference-Header-Content-Length: %d\r\nContent-Length: %d\r\n\r\n"
            % (len(header), len(body)))
    return head + body, x.nbytes


def _connect(server: ServerProcess, receive_buffer: int = 4096) -> socket.socket:
    sock = socket.socket()
    # Small, so that the reply backs up into the server's memory soon.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", server.port))
    return sock


def _read_all(sock: socket.socket, pause: float = 0.0) -> bytes:
    """Everything until the server closes (or resets) the connection."""
    received = b""
    try:
        while chunk := sock.recv(64 * 1024):
            received += chunk
            time.sleep(pause)
    except ConnectionResetError:
        pass
    return received


@pytest.mark.parametrize("close", [False, True], ids=["keep-alive", "connection-close"])
def test_a_client_that_stops_reading_is_dropped_and_others_are_served(server, close) -> None:
    request, size = _binary_infer(32768)  # 8 MB in, 8 MB out
    if close:  # the server closes its side once the reply is written, not yet sent
        request = request.replace(b"Host: x\r\n", b"Host: x\r\nConnection: close\r\n", 1)
    with _connect(server) as sock:
        sock.sendall(request)
        time.sleep(CLIENT_TIMEOUT + SLACK + 1)
        received = _read_all(sock)
    assert len(received) < size  # cut off: the rest of the reply was dropped
    assert received.startswith(b"HTTP/1.1 200 ")
    assert "reply stalled" in server.log()
    with _connect(server) as sock:  # the server carries on
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert _read_all(sock).startswith(b"HTTP/1.1 200 ")


def test_a_client_that_reads_slowly_gets_its_whole_reply(server) -> None:
    # 8 MB out, read at about 1 MB/s: more than the sockets' buffers hold (several MB on
    # loopback), so the server holds the rest for seconds, while the client reads on.
    request, size = _binary_infer(32768)
    with _connect(server, receive_buffer=64 * 1024) as sock:
        sock.sendall(request.replace(b"Host: x\r\n", b"Host: x\r\nConnection: close\r\n", 1))
        start = time.monotonic()
        received = _read_all(sock, pause=0.05)
        seconds = time.monotonic() - start
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    assert len(body) == length > size
    assert seconds > 2 * CLIENT_TIMEOUT  # it read for longer than the deadline


def test_a_client_that_takes_a_trickle_is_dropped(server) -> None:
    # About 10 KB/s, under the 64 KB per client_timeout a backed-up reply must move.
    request, size = _binary_infer(32768)
    received, start = b"", time.monotonic()
    with _connect(server) as sock:
        sock.sendall(request)
        try:
            while (chunk := sock.recv(1024)) and time.monotonic() - start < 30:
                received += chunk
                time.sleep(0.1)
        except ConnectionResetError:
            pass
    assert len(received) < size
    assert time.monotonic() - start < 10 * CLIENT_TIMEOUT + SLACK
