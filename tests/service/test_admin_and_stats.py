"""Layer admin, /stats, health, metrics and the OpenAPI schema, in-process."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import safetensors.torch
import torch

from .conftest import make_client
from .reference import array, tensor, twin


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _trained_bn(features: int = 8) -> torch.nn.BatchNorm1d:
    bn = torch.nn.BatchNorm1d(features)
    with torch.no_grad():
        for _ in range(3):
            bn(torch.randn(16, features) * 3 + 2)
    return bn


def test_create_from_uploaded_checkpoint_then_normalize_equals_torch(client) -> None:
    bn = _trained_bn()
    upload = safetensors.torch.save({f"enc.bn.{k}": v for k, v in bn.state_dict().items()})
    reply = client.put("/layers/enc.bn", json={
        "kind": "BatchNorm1d", "config": {"num_features": 8, "momentum": 0.2},
        "checkpoint_b64": _b64(upload), "prefix": "enc.bn."})
    assert reply.status_code == 200, reply.text
    assert reply.json()["num_batches_tracked"] == 3
    x = np.random.default_rng(1).normal(size=(6, 8)).astype(np.float32)
    body = client.post("/normalize", json={"layer": "enc.bn", "tensor": tensor(x)}).json()
    with torch.no_grad():
        expected = bn.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(array(body["output"]), expected, atol=1e-5)


def test_download_state_is_safetensors_that_torch_loads(client) -> None:
    x = np.random.default_rng(2).normal(size=(16, 64)).astype(np.float32)
    client.post("/normalize", json={"layer": "stream.bn", "mode": "train", "tensor": tensor(x)})
    reply = client.get("/layers/stream.bn/state")
    assert reply.headers["content-type"] == "application/octet-stream"
    module = twin("BatchNorm1d", {"num_features": 64, "momentum": "cumulative"}, reply.content)
    np.testing.assert_allclose(module.running_mean.numpy(), x.mean(0), atol=1e-6)
    assert int(module.num_batches_tracked) == 1


def test_reset_returns_to_the_checkpoint(client) -> None:
    original = client.get("/stats/digits.bn1").json()
    x = np.random.default_rng(3).normal(5, 2, size=(4, 16, 3, 3)).astype(np.float32)
    client.post("/normalize", json={"layer": "digits.bn1", "mode": "train", "tensor": tensor(x)})
    assert client.get("/stats/digits.bn1").json()["running_mean"] != original["running_mean"]
    reset = client.post("/layers/digits.bn1/reset").json()
    assert reset["running_mean"] == original["running_mean"]
    assert reset["num_batches_tracked"] == original["num_batches_tracked"]


def test_upload_state_replaces_statistics(client) -> None:
    bn = _trained_bn(64)
    reply = client.put("/layers/stream.bn/state", content=safetensors.torch.save(bn.state_dict()),
                       headers={"content-type": "application/octet-stream"})
    assert reply.status_code == 200, reply.text
    np.testing.assert_allclose(reply.json()["running_var"], bn.running_var.numpy(), rtol=1e-6)


def test_delete_then_unknown(client) -> None:
    assert client.delete("/layers/features.gn").status_code == 200
    assert client.get("/stats/features.gn").status_code == 404
    assert client.delete("/layers/features.gn").status_code == 404


@pytest.mark.parametrize(("body", "message"), [
    ({"kind": "Dropout", "config": {}}, "unknown kind"),
    ({"kind": "BatchNorm1d", "config": {"num_features": -1}}, "num_features must be"),
    ({"kind": "BatchNorm1d", "config": {"num_feature": 4}}, "unknown argument"),
    ({"kind": "BatchNorm1d", "config": {"num_features": 4}, "checkpoint_b64": "!!"}, "base64"),
    ({"kind": "BatchNorm1d", "config": {"num_features": 4}, "checkpoint_b64": _b64(b"PK\x03")},
     "not a valid safetensors"),
    ({"kind": "BatchNorm1d", "config": {"num_features": 4},
      "checkpoint_b64": _b64(safetensors.torch.save(torch.nn.BatchNorm1d(5).state_dict()))},
     "expected [4]"),
    ({"kind": "BatchNorm1d", "config": {"num_features": 4}, "device": "tpu"}, "device"),
    ({"kind": "BatchNorm1d"}, "invalid arguments"),
    ({"config": {}}, "kind"),
])
def test_bad_layer_definitions_are_422_and_create_nothing(client, body, message) -> None:
    reply = client.put("/layers/new.layer", json=body)
    assert reply.status_code == 422, reply.text
    assert message in reply.json()["error"]
    assert client.get("/stats/new.layer").status_code == 404


def test_stats_lists_every_layer_with_server_counters(client) -> None:
    x = tensor(np.ones((2, 64), np.float32))
    client.post("/normalize", json={"layer": "features.ln", "tensor": x})
    body = client.get("/stats").json()
    assert len(body["layers"]) == 9
    ln = body["layers"]["features.ln"]
    assert ln["config"] == {"normalized_shape": [64], "eps": 1e-5, "elementwise_affine": True,
                            "bias": True}
    assert "running_mean" not in ln
    assert body["server"]["requests"]["eval"] == 1
    assert body["server"]["persistence"] == "memory"


def test_health_and_metrics(client) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").json()["layers"] == 9
    client.post("/normalize", json={"layer": "features.ln",
                                    "tensor": tensor(np.ones((2, 64), np.float32))})
    client.post("/normalize", json={"layer": "stream.bn", "mode": "train",
                                    "tensor": tensor(np.ones((1, 64), np.float32))})
    text = client.get("/metrics").text
    assert ('normcore_requests_total{layer="features.ln",mode="eval",route="/normalize",'
            'status="200"} 1.0') in text
    assert 'normcore_rejected_requests_total{route="/normalize",status="422"} 1.0' in text
    assert "normcore_request_duration_seconds_bucket" in text


def test_readyz_is_503_until_the_catalog_is_loaded() -> None:
    from service.app import create_app
    from service.settings import Settings

    app = create_app(Settings(threads=1))
    from fastapi.testclient import TestClient

    # Without entering the lifespan nothing is loaded yet.
    client = TestClient(app, raise_server_exceptions=False)
    assert client.get("/readyz").status_code == 503
    assert client.get("/healthz").status_code == 200


def test_kernels_are_built_before_ready_and_follow_the_setting(monkeypatch) -> None:
    import shutil

    from normcore import kernels
    from normcore.kernels import _loader
    from service.settings import Settings

    if not any(map(shutil.which, _loader.COMPILERS)):
        pytest.skip("no C++ compiler on this machine")
    try:
        with make_client() as client:
            assert client.get("/readyz").status_code == 200
            # Built (or loaded from the cache) before ready, and in use.
            assert _loader._state.active is not None, _loader._state.failure
        with make_client(kernels=False) as client:
            assert client.get("/readyz").status_code == 200
            assert not kernels.enabled()
            assert _loader._state.active is None
    finally:
        kernels.set_enabled(True)
    monkeypatch.setenv("NORMCORE_KERNELS", "0")
    assert Settings().kernels is False


def test_openapi_documents_every_route_with_bodies_and_examples(client) -> None:
    schema = client.get("/openapi.json").json()
    post = schema["paths"]["/normalize"]["post"]
    request_schema = post["requestBody"]["content"]["application/json"]["schema"]
    assert "example" in request_schema
    assert "422" in post["responses"]
    for path in ("/stats", "/stats/{name}", "/layers/{name}", "/layers/{name}/reset",
                 "/layers/{name}/state", "/healthz", "/readyz", "/metrics"):
        assert path in schema["paths"]


def test_layer_names_must_be_safe() -> None:
    with make_client() as client:
        reply = client.put("/layers/bad name", json={"kind": "LayerNorm",
                                                     "config": {"normalized_shape": 4}})
        assert reply.status_code == 422


def test_openapi_declares_the_bearer_token(client) -> None:
    # /docs shows an Authorize button, generated clients send the token.
    schema = client.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer",
        "description": schema["components"]["securitySchemes"]["bearer"]["description"]}
    paths = schema["paths"]
    for path, method in (("/normalize", "post"), ("/layers/{name}", "put"),
                         ("/v2/models/{name}/infer", "post"), ("/stats", "get")):
        assert {"bearer": []} in paths[path][method]["security"], path
    for path in ("/healthz", "/readyz", "/v2/health/live"):
        assert paths[path]["get"]["security"] == [], path
