"""CORS: off by default; with NORMCORE_CORS_ORIGINS, browsers on those origins may call the
API (preflight answered, the token header allowed, X-Request-ID readable)."""

from __future__ import annotations

import pytest

from service.settings import Settings

from .conftest import make_client

ORIGIN = "https://dashboard.example"
PREFLIGHT = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization,content-type"}


def test_no_origin_is_allowed_by_default(client) -> None:
    reply = client.get("/stats", headers={"Origin": ORIGIN})
    assert reply.status_code == 200
    assert "access-control-allow-origin" not in reply.headers
    assert "access-control-allow-origin" not in client.options(
        "/normalize", headers=PREFLIGHT).headers


def test_a_listed_origin_gets_preflight_and_replies() -> None:
    with make_client(cors_origins=[ORIGIN, "https://other.example"]) as client:
        preflight = client.options("/normalize", headers=PREFLIGHT)
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == ORIGIN
        assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
        reply = client.get("/stats", headers={"Origin": ORIGIN})
        assert reply.headers["access-control-allow-origin"] == ORIGIN
        assert "x-request-id" in reply.headers["access-control-expose-headers"].lower()
        refused = client.options("/normalize", headers={**PREFLIGHT,
                                                        "Origin": "https://evil.example"})
        assert refused.status_code == 400
        assert "access-control-allow-origin" not in refused.headers


@pytest.mark.parametrize(("value", "origins"), [
    ("https://a.example, https://b.example", ["https://a.example", "https://b.example"]),
    ('["https://a.example"]', ["https://a.example"]),
    ("*", ["*"]),
    ("", []),
])
def test_origins_are_read_comma_separated_or_as_json(monkeypatch, value, origins) -> None:
    monkeypatch.setenv("NORMCORE_CORS_ORIGINS", value)
    assert Settings().cors_origins == origins
