"""X-Request-ID: honoured when usable, generated when absent or unusable, echoed on every
reply (errors and V2 included), and known inside the request."""

from __future__ import annotations

import uuid

import pytest

from service.context import REQUEST_ID, request_id_from

from .conftest import make_client


def _is_uuid(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) == text
    except ValueError:
        return False


@pytest.mark.parametrize(("method", "path", "body"), [
    ("GET", "/healthz", None),
    ("GET", "/stats/no.such.layer", None),  # 404
    ("POST", "/normalize", b"{not json"),  # 400
    ("POST", "/v2/models/stream.bn/infer", b"{}"),  # V2's own error replies
    ("GET", "/v2/health/ready", None),
])
def test_a_clients_id_is_echoed_on_every_reply(client, method, path, body) -> None:
    reply = client.request(method, path, content=body, headers={"X-Request-ID": "abc-123"})
    assert reply.headers["x-request-id"] == "abc-123"


def test_an_id_is_generated_for_each_request_without_one(client) -> None:
    ids = {client.get("/healthz").headers["x-request-id"] for _ in range(3)}
    assert len(ids) == 3
    assert all(_is_uuid(i) for i in ids)


@pytest.mark.parametrize("sent", ["", "a b", "x" * 129, "caf\u00e9", "tab\tin"])
def test_an_unusable_id_is_replaced(client, sent) -> None:
    reply = client.get("/healthz", headers={"X-Request-ID": sent.encode("utf-8")})
    assert _is_uuid(reply.headers["x-request-id"])


def test_an_id_rejected_by_the_token_check_is_echoed_too() -> None:
    with make_client(api_token="request-id-test-token") as client:
        reply = client.post("/layers/stream.bn/reset", headers={"X-Request-ID": "r-1"})
        assert reply.status_code == 401
        assert reply.headers["x-request-id"] == "r-1"


def test_the_id_is_known_inside_the_request_only() -> None:
    assert REQUEST_ID.get() is None
    assert request_id_from(b"from-bytes") == "from-bytes"
    assert _is_uuid(request_id_from(None))
