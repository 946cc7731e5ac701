"""The V2 extensions beyond infer, through unmodified tritonclient calls over HTTP and gRPC
against a real server: the repository index, unload (state kept) and load, model
configuration, statistics in Triton's shape, and a version that changes when a layer is
replaced."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from service.core.catalog import load_catalog
from tests.server_process import free_port, service_process

from .conftest import make_client

TOKEN = "repository-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LAYERS = sorted(spec.name for spec in load_catalog())


@pytest.fixture(scope="module")
def server():
    grpc_port = free_port()
    env = {"NORMCORE_DEVICE": "cpu", "NORMCORE_API_TOKEN": TOKEN}
    with service_process(["--grpc-port", str(grpc_port)], env=env) as proc:
        proc.grpc_url = f"127.0.0.1:{grpc_port}"
        yield proc


@pytest.fixture(scope="module")
def h(server):
    client = triton_http.InferenceServerClient(server.url.removeprefix("http://"))
    yield client
    client.close()


@pytest.fixture(scope="module")
def g(server):
    with triton_grpc.InferenceServerClient(server.grpc_url) as client:
        yield client


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, trust_env=False, timeout=60, headers=AUTH) as c:
        yield c


def _infer(client, module, name: str, x: np.ndarray):
    tensor = module.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return client.infer(name, [tensor])


def test_the_index_lists_every_layer_ready(h, g) -> None:
    index = h.get_model_repository_index()
    assert sorted(m["name"] for m in index) == LAYERS
    assert all((m["version"], m["state"]) == ("1", "READY") for m in index)
    models = g.get_model_repository_index(as_json=True)["models"]
    assert sorted(m["name"] for m in models) == LAYERS


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_unload_stops_serving_and_keeps_state_until_load(h, g, http, transport) -> None:
    client, module, auth = ((h, triton_http, AUTH) if transport == "http"
                            else (g, triton_grpc, {k.lower(): v for k, v in AUTH.items()}))
    name = "features.in"
    x = np.random.default_rng(0).normal(size=(2, 16, 8)).astype(np.float32)
    before = _infer(client, module, name, x).as_numpy("output")
    state = http.get(f"/layers/{name}/state").content
    client.unload_model(name, headers=auth)
    assert not client.is_model_ready(name)
    with pytest.raises(InferenceServerException, match="is unloaded"):
        _infer(client, module, name, x)
    states = {m["name"]: m["state"] for m in h.get_model_repository_index()}
    assert states[name] == "UNAVAILABLE"
    assert h.get_model_repository_index(query_params=None)  # still listed
    assert http.get(f"/layers/{name}/state").content == state  # kept as it was
    client.load_model(name, headers=auth)
    assert client.is_model_ready(name)
    np.testing.assert_array_equal(_infer(client, module, name, x).as_numpy("output"), before)


def test_load_and_unload_need_the_token(h, g) -> None:
    with pytest.raises(InferenceServerException, match="missing bearer token"):
        h.unload_model("features.ln")
    with pytest.raises(InferenceServerException) as error:
        g.unload_model("features.ln", headers={"authorization": "Bearer wrong"})
    assert error.value.status() == "StatusCode.PERMISSION_DENIED"
    assert h.is_model_ready("features.ln")


def test_a_load_cannot_change_the_configuration(h) -> None:
    with pytest.raises(InferenceServerException, match="cannot change a layer's configuration"):
        h.load_model("features.ln", headers=AUTH, config='{"max_batch_size": 8}')


def test_the_configuration_gives_tensors_and_constructor_arguments(h, g) -> None:
    config = h.get_model_config("stream.bn")
    assert (config["name"], config["platform"], config["max_batch_size"]) == (
        "stream.bn", "normcore", 0)
    assert config["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [-1, 64]}]
    assert [o["name"] for o in config["output"]] == ["output", "batch_mean", "batch_var"]
    assert config["parameters"]["kind"] == {"string_value": "BatchNorm1d"}
    assert config["parameters"]["num_features"] == {"string_value": "64"}
    over_grpc = g.get_model_config("stream.bn", as_json=True)["config"]
    assert over_grpc["input"][0]["data_type"] == "TYPE_FP32"
    assert over_grpc["parameters"] == config["parameters"]


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_statistics_count_requests_and_compute_time(h, g, transport) -> None:
    client, module = (h, triton_http) if transport == "http" else (g, triton_grpc)

    def stats() -> dict:
        reply = client.get_inference_statistics("features.rms", **(
            {} if transport == "http" else {"as_json": True}))
        (entry,) = reply["model_stats"]
        return entry

    before = stats()
    for _ in range(2):
        _infer(client, module, "features.rms", np.ones((3, 64), np.float32))
    after = stats()
    assert after["name"] == "features.rms"
    assert after["version"] == "1"
    assert int(after["inference_count"]) == int(before.get("inference_count", 0)) + 2
    success = after["inference_stats"]["success"]
    assert int(success["count"]) >= 2
    assert int(success["ns"]) > int(before["inference_stats"]["success"].get("ns", 0))
    assert int(after["last_inference"]) > 0
    everything = (h.get_inference_statistics() if transport == "http"
                  else g.get_inference_statistics(as_json=True))
    assert sorted(m["name"] for m in everything["model_stats"]) == LAYERS


def test_replacing_a_layer_changes_its_version() -> None:
    with make_client() as client:
        assert client.get("/v2/models/features.ln").json()["versions"] == ["1"]
        reply = client.put("/layers/features.ln", json={
            "kind": "LayerNorm", "config": {"normalized_shape": [64]}})
        assert reply.status_code == 200, reply.text
        assert client.get("/v2/models/features.ln").json()["versions"] == ["2"]
        assert client.get("/v2/models/features.ln/versions/1/ready").status_code == 404
        assert client.get("/v2/models/features.ln/versions/2/ready").status_code == 200
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 64],
                            "data": [1.0] * 64}]}
        reply = client.post("/v2/models/features.ln/versions/2/infer", json=body)
        assert reply.json()["model_version"] == "2"
        assert client.post("/v2/models/features.ln/versions/1/infer", json=body).status_code == 404
        index = client.post("/v2/repository/index").json()
        assert {m["name"]: m["version"] for m in index}["features.ln"] == "2"
        assert client.get("/v2/models/features.ln/config").status_code == 200
        assert client.get("/v2/models/features.ln/versions/1/config").status_code == 404


def test_the_index_can_list_the_served_layers_only() -> None:
    with make_client() as client:
        assert client.post("/v2/repository/models/stream.bn/unload").status_code == 200
        every = client.post("/v2/repository/index", json={}).json()
        ready = client.post("/v2/repository/index", json={"ready": True}).json()
        assert len(every) == len(ready) + 1
        assert "stream.bn" not in {m["name"] for m in ready}
        refused = client.post("/normalize", json={
            "layer": "stream.bn", "tensor": {"shape": [1, 64], "data": [0.0] * 64}})
        assert refused.status_code == 404
        assert client.post("/v2/repository/index", json={"ready": 1}).status_code == 400
        assert client.post("/v2/repository/models/no.such/load").status_code == 404
