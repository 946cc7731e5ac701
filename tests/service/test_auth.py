"""Who may change state: the bearer token, protected reads, and open health endpoints."""

from __future__ import annotations

import base64
import hmac
import logging

import numpy as np
import pytest
import safetensors.torch
import torch
from pydantic import ValidationError

from service.settings import Settings

from .conftest import make_client
from .reference import tensor

TOKEN = "s3cret-token-0123456789abcdef"
GOOD = {"Authorization": f"Bearer {TOKEN}"}
X = tensor(np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32))
STATE = safetensors.torch.save(torch.nn.BatchNorm1d(64).state_dict())

# Every state-changing (or whole-state-exposing) request, valid apart from the token.
WRITES = {
    "train": ("POST", "/normalize", {"json": {"layer": "stream.bn", "mode": "train",
                                              "tensor": X}}),
    "create": ("PUT", "/layers/new.bn", {"json": {"kind": "BatchNorm1d",
                                                  "config": {"num_features": 4}}}),
    "replace": ("PUT", "/layers/stream.bn", {"json": {"kind": "LayerNorm",
                                                      "config": {"normalized_shape": 64}}}),
    "delete": ("DELETE", "/layers/stream.bn", {}),
    "reset": ("POST", "/layers/stream.bn/reset", {}),
    "download": ("GET", "/layers/stream.bn/state", {}),
    "upload": ("PUT", "/layers/stream.bn/state", {"content": STATE}),
}
READS = {
    "eval": ("POST", "/normalize", {"json": {"layer": "stream.bn", "tensor": X}}),
    "stats": ("GET", "/stats", {}),
    "layer stats": ("GET", "/stats/stream.bn", {}),
}
OPEN = ["/healthz", "/readyz", "/openapi.json"]
BAD_CREDENTIALS = {
    None: 401,
    "Bearer": 401,
    "Basic dXNlcjpwYXNz": 401,
    f"Token {TOKEN}": 401,
    "Bearer wrong-token": 403,
    f"Bearer {TOKEN}x": 403,
    f"Bearer {TOKEN[:-1]}": 403,
}


def _layers(client) -> dict:
    """Everything the service knows about its layers (not its uptime)."""
    return client.get("/stats", headers=GOOD).json()["layers"]


def _send(client, request, authorization: str | None):
    method, path, kwargs = request
    headers = {} if authorization is None else {"Authorization": authorization}
    return client.request(method, path, headers=headers, **kwargs)


@pytest.fixture
def guarded():
    with make_client(api_token=TOKEN) as c:
        yield c


@pytest.mark.parametrize("name", WRITES)
@pytest.mark.parametrize("authorization", BAD_CREDENTIALS)
def test_writes_without_the_token_are_refused_and_change_nothing(guarded, name, authorization):
    before = _layers(guarded)
    reply = _send(guarded, WRITES[name], authorization)
    assert reply.status_code == BAD_CREDENTIALS[authorization], reply.text
    assert "bearer token" in reply.json()["error"]
    if reply.status_code == 401:
        assert reply.headers["www-authenticate"] == "Bearer"
    assert _layers(guarded) == before


@pytest.mark.parametrize("name", WRITES)
def test_writes_with_the_token_succeed(guarded, name: str) -> None:
    reply = _send(guarded, WRITES[name], f"Bearer {TOKEN}")
    assert reply.status_code == 200, reply.text


def test_scheme_is_case_insensitive(guarded) -> None:
    assert _send(guarded, WRITES["reset"], f"bearer {TOKEN}").status_code == 200


def test_the_token_is_compared_in_constant_time(guarded, monkeypatch) -> None:
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    assert _send(guarded, WRITES["reset"], "Bearer wrong").status_code == 403
    assert calls == [(b"wrong", TOKEN.encode())]


@pytest.mark.parametrize("name", READS)
def test_reads_are_open_unless_protected(guarded, name: str) -> None:
    assert _send(guarded, READS[name], None).status_code == 200


@pytest.mark.parametrize("name", READS)
def test_protected_reads_need_the_token(name: str) -> None:
    with make_client(api_token=TOKEN, protect_reads=True) as client:
        assert _send(client, READS[name], None).status_code == 401
        assert _send(client, READS[name], "Bearer wrong").status_code == 403
        assert _send(client, READS[name], f"Bearer {TOKEN}").status_code == 200


def test_protected_reads_do_not_reveal_which_layers_exist() -> None:
    with make_client(api_token=TOKEN, protect_reads=True) as client:
        for layer in ("stream.bn", "no.such.layer"):
            reply = client.post("/normalize", json={"layer": layer, "tensor": X})
            assert reply.status_code == 401
            assert client.get(f"/stats/{layer}").status_code == 401


@pytest.mark.parametrize("path", OPEN)
def test_health_stays_open(path: str) -> None:
    with make_client(api_token=TOKEN, protect_reads=True) as client:
        assert client.get(path).status_code == 200


def test_metrics_need_the_token_when_reads_are_protected() -> None:
    # /metrics names every layer: with reads protected it is a read like any other.
    with make_client(api_token=TOKEN, protect_reads=True) as client:
        assert client.get("/metrics").status_code == 401
        reply = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        assert reply.status_code == 200
        assert "normcore_requests_total" in reply.text
    with make_client(api_token=TOKEN) as client:
        assert client.get("/metrics").status_code == 200


def test_protecting_reads_without_a_token_is_refused() -> None:
    with pytest.raises(ValidationError, match="protect_reads needs api_token"):
        Settings(protect_reads=True)


def test_the_token_is_a_secret_that_is_never_shown(guarded, caplog) -> None:
    settings = Settings(api_token=TOKEN)
    for text in (repr(settings), str(settings), settings.model_dump_json()):
        assert TOKEN not in text
    caplog.set_level(logging.DEBUG)
    for authorization in (f"Bearer {TOKEN}", f"Bearer {TOKEN}x"):
        _send(guarded, WRITES["reset"], authorization)
    assert TOKEN not in caplog.text


def test_a_short_token_is_warned_about(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="normcore.service")
    with make_client(api_token="short"):
        pass
    assert "shorter than 16 characters" in caplog.text
    assert "short" not in caplog.text.replace("shorter", "")


# --- non-finite values in train steps -----------------------------------------------------

def _b64_with(value: float, shape=(4, 16, 2, 2)) -> dict:
    x = np.random.default_rng(1).normal(size=shape).astype("<f4")
    x.flat[5] = value
    return {"shape": list(shape), "dtype": "float32", "b64": base64.b64encode(x.tobytes()).decode()}


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_train_steps_are_refused_by_default(guarded, value: float) -> None:
    before = guarded.get("/stats/digits.bn1").json()
    reply = guarded.post("/normalize", headers=GOOD, json={
        "layer": "digits.bn1", "mode": "train", "tensor": _b64_with(value)})
    assert reply.status_code == 422
    assert "non-finite" in reply.json()["error"]
    after = guarded.get("/stats/digits.bn1").json()
    for key in ("running_mean", "running_var", "num_batches_tracked", "requests"):
        assert after[key] == before[key]
    assert after["rejected"] == before["rejected"] + 1


def test_non_finite_train_steps_are_taken_when_allowed() -> None:
    with make_client(allow_non_finite=True) as client:
        before = client.get("/stats/digits.bn1").json()["num_batches_tracked"]
        reply = client.post("/normalize", json={
            "layer": "digits.bn1", "mode": "train", "tensor": _b64_with(np.nan)})
        assert reply.status_code == 200, reply.text
        entry = client.get("/stats/digits.bn1").json()
        assert entry["num_batches_tracked"] == before + 1
        assert None in entry["running_mean"]  # NaN, which JSON writes as null
