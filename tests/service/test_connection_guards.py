"""The real server process against raw sockets: bodies over the limit are refused before
they are sent, and slow clients are cut off in bounded time while others are served."""

from __future__ import annotations

import json
import re
import select
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from service.settings import Settings
from tests.server_process import ServerProcess, service_process

from .reference import tensor

pytestmark = pytest.mark.slow

TOKEN = "guard-token-0123456789abcdef"
LIMIT = 64 * 1024
CLIENT_TIMEOUT = 2.0
# How late past the client timeout a connection may still be open (a loaded 2-core box).
SLACK = 1.5


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    env = {"NORMCORE_CLIENT_TIMEOUT": str(CLIENT_TIMEOUT), "NORMCORE_MAX_BODY_BYTES": str(LIMIT),
           "NORMCORE_API_TOKEN": TOKEN, "NORMCORE_THREADS": "1"}
    with service_process(env=env) as proc:
        yield proc


def _connect(server: ServerProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=5)


def _response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP response with a Content-Length body: (status, headers, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response; got {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-body"
        body += chunk
    return int(status_line.split()[1]), headers, body


def _closed(sock: socket.socket, timeout: float = 5.0) -> bool:
    """Whether the server closes the connection (EOF or reset) within ``timeout``."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True


# --- the body limit, for every route --------------------------------------------------

ROUTES = [("POST", "/normalize"), ("PUT", "/layers/new.bn"), ("PUT", "/layers/stream.bn/state"),
          ("GET", "/stats"), ("GET", "/healthz"), ("POST", "/no/such/route")]


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_a_declared_body_over_the_limit_is_refused_before_it_is_sent(server, method, path):
    with _connect(server) as sock:
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {100 * LIMIT}\r\n\r\n".encode() + b"[" * 1000)
        start = time.monotonic()
        status, headers, body = _response(sock)
        assert time.monotonic() - start < 1.0
        assert status == 413, body
        assert headers["connection"] == "close"
        assert json.loads(body) == {"error": f"request body exceeds the limit of {LIMIT} bytes"}
        assert _closed(sock)  # and the rest is never read


@pytest.mark.parametrize(("method", "path"), ROUTES[:3])
def test_a_chunked_body_is_refused_once_it_passes_the_limit(server, method: str, path: str):
    with _connect(server) as sock:
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n".encode())
        for _ in range(LIMIT // 4096 + 2):  # past the limit, never the last chunk
            sock.sendall(b"1000\r\n" + b"0" * 4096 + b"\r\n")
        status, headers, body = _response(sock)
        assert status == 413, body
        assert headers["connection"] == "close"
        assert _closed(sock)


def test_a_route_that_reads_no_body_answers_and_closes_without_reading_it(server) -> None:
    with _connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"10\r\n0123456789abcdef\r\n")
        status, headers, _ = _response(sock)
        assert status == 200
        assert headers["connection"] == "close"
        assert _closed(sock)


def test_bodies_within_the_limit_keep_the_connection(server) -> None:
    body = json.dumps({"layer": "stream.bn", "tensor": tensor(np.ones((2, 64)))}).encode()
    with _connect(server) as sock:
        for _ in range(3):
            sock.sendall(b"POST /normalize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                         b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            status, headers, _ = _response(sock)
            assert status == 200
            assert "connection" not in headers


def test_request_heads_are_capped_and_garbage_is_a_json_400(server) -> None:
    with _connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n")
        status, _, body = _response(sock)
        assert status == 431
        assert "exceed" in json.loads(body)["error"]
    with _connect(server) as sock:
        sock.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")
        status, _, body = _response(sock)
        assert status == 400
        assert json.loads(body) == {"error": "malformed HTTP request"}


# --- slow clients -----------------------------------------------------------------------

_BODY = json.dumps({"layer": "stream.bn", "tensor": tensor(np.ones((2, 64)))}).encode()
_HEAD = (b"POST /normalize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
         b"Content-Length: %d\r\n\r\n" % len(_BODY))
# (bytes sent at once, bytes then trickled one at a time): none completes before the cutoff.
SLOW = {
    "silent": (b"", b""),
    "head trickled": (b"", _HEAD + _BODY),
    "body trickled": (_HEAD, _BODY),
    "chunked body trickled": (b"POST /normalize HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: "
                              b"chunked\r\n\r\n", b"%x\r\n%s\r\n0\r\n\r\n" % (len(_BODY), _BODY)),
    "second request trickled": (b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", _HEAD + _BODY),
}


def _slow_client(server: ServerProcess, at_once: bytes, trickled: bytes, result: dict) -> None:
    """Send ``at_once``, then a byte every 50 ms, until the server closes the connection;
    ``result`` gets the seconds that took, and the statuses of the answers read."""
    received = b""
    start = time.monotonic()
    with _connect(server) as sock:
        sock.sendall(at_once)
        pending = list(trickled)
        while time.monotonic() - start < CLIENT_TIMEOUT + 10:
            readable, _, _ = select.select([sock], [], [], 0.05)
            if readable:
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    chunk = b""
                if not chunk:
                    break
                received += chunk
                continue
            if pending:
                try:
                    sock.send(bytes([pending.pop(0)]))
                except (BrokenPipeError, ConnectionResetError):
                    break
    statuses = [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", received)]
    result.update(seconds=time.monotonic() - start, statuses=statuses)


def _busy_client(server: ServerProcess, stop: threading.Event, latencies: list) -> None:
    with httpx.Client(base_url=server.url, timeout=5) as client:
        while not stop.is_set():
            start = time.monotonic()
            reply = client.post("/normalize", content=_BODY)
            reply.raise_for_status()
            client.get("/stats").raise_for_status()
            latencies.append(time.monotonic() - start)
            time.sleep(0.02)


def test_slow_clients_are_cut_off_while_others_are_served(server) -> None:
    results = {f"{kind} #{i}": {} for kind in SLOW for i in range(2)}
    threads = [threading.Thread(target=_slow_client, args=(server, *SLOW[name[:-3]], result))
               for name, result in results.items()]
    stop, latencies = threading.Event(), []
    busy = threading.Thread(target=_busy_client, args=(server, stop, latencies))
    for thread in [*threads, busy]:
        thread.start()
    for thread in threads:
        thread.join(CLIENT_TIMEOUT + 15)
    stop.set()
    busy.join(10)
    for name, result in results.items():
        assert CLIENT_TIMEOUT - 0.3 < result["seconds"] < CLIENT_TIMEOUT + SLACK, \
            (name, result, server.log()[-3000:])
        # Told why, unless its connection was mid-response.
        assert result["statuses"][-1] == 408, (name, result)
    assert len(latencies) >= 20
    assert max(latencies) < 1.0, sorted(latencies)[-5:]


def test_a_normal_client_is_not_cut_off(server) -> None:
    with httpx.Client(base_url=server.url, timeout=5) as client:
        for _ in range(3):
            assert client.get("/healthz").status_code == 200
            time.sleep(CLIENT_TIMEOUT / 2)  # idle between requests is keep-alive's business


def test_the_client_timeout_defaults_to_ten_seconds() -> None:
    assert Settings().client_timeout == 10.0


def test_the_token_never_reaches_the_log(server) -> None:
    for token in (TOKEN, TOKEN + "x"):
        httpx.post(f"{server.url}/layers/stream.bn/reset",
                   headers={"Authorization": f"Bearer {token}"})
    assert TOKEN not in server.log()
