"""KServe V2 against a real server process, through an unmodified tritonclient: health,
metadata, eval and train infer with JSON and binary tensors in every datatype,
compression, large tensors, and parity with torch.nn on the same inputs."""

from __future__ import annotations

import gzip
import json

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.server_process import service_process

from .v2_helpers import (
    batch_stats,
    infer,
    reference_layer,
    to_numpy,
    to_torch,
    triton_client,
)

TOKEN = "v2-test-token"

# layer -> (input shape for the tests, input shape in the model metadata, stats shape)
LAYERS = {
    "digits.bn1": ((4, 16, 5, 5), [-1, 16, -1, -1], [16]),
    "digits.head.bn": ((8, 64), [-1, 64], [64]),
    "features.ln": ((3, 5, 64), [-1, 64], [-1]),
    "features.rms": ((6, 64), [-1, 64], [-1]),
    "features.gn": ((4, 32, 6), [-1, 32], [-1, 8]),
    "features.in": ((4, 16, 10), [-1, 16, -1], [-1, 16]),
    "stream.bn": ((8, 64), [-1, 64], [64]),
}
# datatype -> (atol, rtol) of the output against torch.nn on the same (cast) input
TOLERANCES = {"FP32": (1e-5, 1e-5), "FP16": (2e-3, 2e-3), "BF16": (2e-2, 2e-2),
              "FP64": (1e-12, 1e-12)}


def stat_names(kind: str) -> list[str]:
    return ["batch_mean_square"] if kind == "RMSNorm" else ["batch_mean", "batch_var"]


def check_outputs(result, kind, layer, x, datatype, *, train=False):
    """``result`` holds what torch.nn computes for ``x`` (``layer`` in the same mode;
    a train call updates its running statistics)."""
    expected = layer.train(train)(x)
    layer.eval()
    atol, rtol = TOLERANCES[datatype]
    output = to_torch(result.as_numpy("output"))
    assert output.dtype == x.dtype
    torch.testing.assert_close(output, expected.detach(), atol=atol, rtol=rtol)
    for name, value in batch_stats(kind, layer, x).items():
        got = result.as_numpy(name)
        assert got.dtype == np.float32, name
        torch.testing.assert_close(to_torch(got).double(), value, atol=1e-4, rtol=1e-4)


# --- health and metadata ----------------------------------------------------------------


def test_server_is_live_and_ready(v2_client):
    assert v2_client.is_server_live()
    assert v2_client.is_server_ready()


def test_server_metadata_names_the_binary_extension(v2_client):
    meta = v2_client.get_server_metadata()
    assert meta["name"] == "normcore"
    assert isinstance(meta["version"], str)
    assert "binary_tensor_data" in meta["extensions"]


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_every_catalog_layer_is_a_ready_model(v2_client, name):
    assert v2_client.is_model_ready(name)
    assert v2_client.is_model_ready(name, "1")


@pytest.mark.parametrize(("name", "version"), [("no.such.layer", ""), ("features.ln", "2")])
def test_unknown_model_or_version_is_not_ready(v2_client, name, version):
    assert not v2_client.is_model_ready(name, version)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_model_metadata_gives_shapes_with_free_dims(v2_client, http, name):
    _, input_shape, stats_shape = LAYERS[name]
    kind, _ = reference_layer(http, name)
    for version in ("", "1"):
        meta = v2_client.get_model_metadata(name, version)
        assert meta["name"] == name
        assert meta["versions"] == ["1"]
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": input_shape}]
        assert meta["outputs"] == [
            {"name": "output", "datatype": "FP32", "shape": input_shape},
            *({"name": s, "datatype": "FP32", "shape": stats_shape} for s in stat_names(kind)),
            {"name": "drift", "datatype": "FP32", "shape": [1]},
        ]


@pytest.mark.parametrize("binary", [True, False])
def test_eval_infer_gives_the_drift_score_when_asked_for(v2_client, http, binary):
    x = np.random.default_rng(5).normal(0, 1, LAYERS["stream.bn"][0]).astype(np.float32)
    result = infer(v2_client, "stream.bn", x, "FP32", binary=binary,
                   outputs=["output", "drift"])
    drift = result.as_numpy("drift")
    assert drift.shape == (1,)
    assert drift.dtype == np.float32
    latest = http.get("/stats/stream.bn").json()["drift"]["score"]
    assert drift[0] == pytest.approx(latest, rel=1e-6)


# --- eval -------------------------------------------------------------------------------


# tritonclient sends BF16 as binary only.
ENCODINGS = [("FP32", "binary"), ("FP32", "json"), ("FP16", "binary"), ("FP16", "json"),
             ("BF16", "binary")]


# torch.nn's RMSNorm says so for reduced-precision input with float32 weights.
@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
@pytest.mark.parametrize(("datatype", "encoding"), ENCODINGS)
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_eval_matches_torch(v2_client, http, name, datatype, encoding):
    kind, layer = reference_layer(http, name)
    x = (torch.randn(LAYERS[name][0]) * 3 + 1).to(torch.float32)
    x = to_torch(to_numpy(x, datatype))
    result = infer(v2_client, name, to_numpy(x, datatype), datatype, binary=encoding == "binary",
                   outputs=["output", *stat_names(kind)], parameters={"mode": "eval"})
    check_outputs(result, kind, layer, x, datatype)
    assert result.get_response()["parameters"]["mode"] == "eval"


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_fp64_is_computed_in_float64(v2_client, http, name):
    kind, layer = reference_layer(http, name)
    x = torch.randn(LAYERS[name][0], dtype=torch.float64)
    result = infer(v2_client, name, x.numpy(), "FP64", outputs=["output", *stat_names(kind)])
    check_outputs(result, kind, layer.double(), x, "FP64")


def test_default_is_eval_and_the_output_alone_in_binary(v2_client, http):
    _, layer = reference_layer(http, "digits.head.bn")
    x = torch.randn(8, 64)
    result = infer(v2_client, "digits.head.bn", x.numpy(), "FP32")  # no outputs, no mode
    response = result.get_response()
    assert [o["name"] for o in response["outputs"]] == ["output"]
    assert "binary_data_size" in response["outputs"][0]["parameters"]
    torch.testing.assert_close(to_torch(result.as_numpy("output")), layer(x).detach())


def test_outputs_are_binary_or_json_as_each_asks(v2_client):
    x = np.random.default_rng(1).standard_normal((4, 64), dtype=np.float32)
    tensor = triton.InferInput("x", [4, 64], "FP32")
    tensor.set_data_from_numpy(x)
    wanted = [triton.InferRequestedOutput(n, binary_data=b)
              for n, b in (("batch_var", False), ("output", True), ("batch_mean", False))]
    result = v2_client.infer("features.ln", [tensor], outputs=wanted, request_id="req-7")
    response = result.get_response()
    assert response["id"] == "req-7"
    assert response["model_name"] == "features.ln"
    assert [o["name"] for o in response["outputs"]] == ["batch_var", "output", "batch_mean"]
    assert ["data" in o for o in response["outputs"]] == [True, False, True]
    assert result.as_numpy("output").shape == (4, 64)
    np.testing.assert_allclose(result.as_numpy("batch_mean"), x.mean(1), atol=1e-6)


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
def test_bf16_output_is_binary_even_when_json_is_asked(v2_client):
    x = to_numpy(torch.randn(2, 64), "BF16")
    result = infer(v2_client, "features.rms", x, "BF16", outputs=["output"], binary_outputs=False)
    assert "binary_data_size" in result.get_output("output")["parameters"]
    assert result.as_numpy("output").dtype == x.dtype


def test_nested_json_data_is_accepted(http):
    x = torch.randn(2, 64)
    body = {"inputs": [{"name": "x", "shape": [2, 64], "datatype": "FP32",
                        "data": x.tolist()}]}
    response = http.post("/v2/models/features.ln/infer", content=json.dumps(body))
    assert response.status_code == 200, response.text
    (output,) = response.json()["outputs"]
    expected = torch.nn.functional.layer_norm(x, [64])
    torch.testing.assert_close(torch.tensor(output["data"]).reshape(2, 64), expected)


def test_versioned_infer_path(v2_client):
    x = np.ones((2, 64), np.float32)
    result = infer(v2_client, "features.ln", x, "FP32", model_version="1")
    assert result.get_response()["model_version"] == "1"


# --- train ------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "shape"), [
    ("stream.bn", (16, 64)), ("digits.head.bn", (12, 64)), ("digits.bn1", (4, 16, 3, 3)),
])
def test_train_updates_running_stats_like_torch(v2_client, http, name, shape):
    kind, layer = reference_layer(http, name)
    for step in range(3):
        x = torch.randn(shape) * (step + 1) + step
        result = infer(v2_client, name, x.numpy(), "FP32", binary=step != 1,
                       outputs=["output", *stat_names(kind)],
                       parameters={"mode": "train", "request_id": f"{name}-{step}"})
        check_outputs(result, kind, layer, x, "FP32", train=True)
        tracked = int(layer.num_batches_tracked)
        assert result.get_response()["parameters"]["num_batches_tracked"] == tracked
    entry = http.get(f"/stats/{name}").json()
    torch.testing.assert_close(torch.tensor(entry["running_mean"], dtype=torch.float64),
                               layer.running_mean.double(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(entry["running_var"], dtype=torch.float64),
                               layer.running_var.double(), atol=1e-6, rtol=1e-5)
    assert entry["num_batches_tracked"] == int(layer.num_batches_tracked)


# --- compression ------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_request_and_response(v2_client, http, algorithm, binary):
    kind, layer = reference_layer(http, "features.gn")
    x = torch.randn(4, 32, 6)
    result = infer(v2_client, "features.gn", x.numpy(), "FP32", binary=binary,
                   outputs=["output", *stat_names(kind)],
                   request_compression_algorithm=algorithm,
                   response_compression_algorithm=algorithm)
    check_outputs(result, kind, layer, x, "FP32")


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_response_is_compressed_only_when_offered(http, algorithm):
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32",
                                   "data": [0.5] * 64}]})
    offered = http.post("/v2/models/features.ln/infer", content=body,
                        headers={"Accept-Encoding": algorithm})
    assert offered.headers["content-encoding"] == algorithm
    assert offered.json()["outputs"][0]["shape"] == [1, 64]
    plain = http.post("/v2/models/features.ln/infer", content=body,
                      headers={"Accept-Encoding": "identity"})
    assert "content-encoding" not in plain.headers


def test_float_tensors_go_plain_even_when_compression_is_offered(http):
    # Accept-Encoding allows compression, it does not demand it: noise saves almost nothing.
    x = np.random.default_rng(0).standard_normal((4096, 64)).astype(np.float32)
    header = json.dumps({"inputs": [{"name": "x", "shape": [4096, 64], "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "parameters": {"binary_data_output": True}}).encode()
    reply = http.post("/v2/models/features.ln/infer", content=header + x.tobytes(),
                      headers={"Inference-Header-Content-Length": str(len(header)),
                               "Accept-Encoding": "gzip, deflate"})
    assert reply.status_code == 200
    assert "content-encoding" not in reply.headers
    assert len(reply.content) > x.nbytes


def test_gzip_request_of_several_members(http):
    header = json.dumps({"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 256}}],
                         "parameters": {"binary_data_output": True}}).encode()
    blob = np.arange(64, dtype=np.float32).tobytes()
    response = http.post(
        "/v2/models/features.ln/infer", content=gzip.compress(header) + gzip.compress(blob),
        headers={"Content-Encoding": "gzip", "Inference-Header-Content-Length": str(len(header))},
    )
    assert response.status_code == 200, response.text
    length = int(response.headers["inference-header-content-length"])
    output = np.frombuffer(response.content[length:], np.float32)
    expected = torch.nn.functional.layer_norm(torch.arange(64.0), [64]).numpy()
    np.testing.assert_allclose(output, expected, atol=1e-5)


# --- large tensors and the token ----------------------------------------------------------


@pytest.fixture(scope="module")
def guarded_url():
    """A server with a token, and a body limit a 64 MiB tensor and its header fit in."""
    env = {"NORMCORE_API_TOKEN": TOKEN, "NORMCORE_MAX_BODY_BYTES": str(72 << 20),
           "NORMCORE_DEVICE": "cpu"}
    with service_process(env=env) as server:
        yield server.url


def test_4_mib_binary_tensor(v2_client, http):
    kind, layer = reference_layer(http, "digits.bn1")
    x = torch.randn(64, 16, 32, 32)  # 4 MiB of FP32
    result = infer(v2_client, "digits.bn1", x.numpy(), "FP32",
                   outputs=["output", *stat_names(kind)])
    check_outputs(result, kind, layer, x, "FP32")


def test_64_mib_binary_tensor(guarded_url):
    x = torch.randn(1 << 18, 64)  # 64 MiB of FP32
    result = infer(triton_client(guarded_url), "features.ln", x.numpy(), "FP32")
    output = to_torch(result.as_numpy("output"))
    torch.testing.assert_close(output, torch.nn.functional.layer_norm(x, [64]),
                               atol=1e-5, rtol=1e-5)


def test_train_needs_the_token_and_eval_does_not(guarded_url):
    v2_client = triton_client(guarded_url)
    x = np.random.default_rng(2).standard_normal((8, 64), dtype=np.float32)
    infer(v2_client, "stream.bn", x, "FP32")
    with pytest.raises(InferenceServerException, match="missing bearer token") as missing:
        infer(v2_client, "stream.bn", x, "FP32", parameters={"mode": "train"})
    assert missing.value.status() == "401"
    with pytest.raises(InferenceServerException, match="invalid bearer token") as wrong:
        infer(v2_client, "stream.bn", x, "FP32", parameters={"mode": "train"},
              headers={"Authorization": "Bearer nope"})
    assert wrong.value.status() == "403"
    with httpx.Client(base_url=guarded_url, trust_env=False) as http:
        assert http.get("/stats/stream.bn").json()["num_batches_tracked"] == 0
        result = infer(v2_client, "stream.bn", x, "FP32", parameters={"mode": "train"},
                       headers={"Authorization": f"Bearer {TOKEN}"})
        assert result.get_response()["parameters"]["num_batches_tracked"] == 1
        assert http.get("/stats/stream.bn").json()["num_batches_tracked"] == 1


@pytest.fixture(scope="module")
def protected_url():
    """A server whose reads need the token too."""
    env = {"NORMCORE_API_TOKEN": TOKEN, "NORMCORE_PROTECT_READS": "true",
           "NORMCORE_DEVICE": "cpu"}
    with service_process(env=env) as server:
        yield server.url


def test_protected_reads_need_the_token(protected_url):
    v2_client = triton_client(protected_url)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    x = np.ones((2, 64), np.float32)
    assert v2_client.is_server_live()
    assert v2_client.is_server_ready()
    assert not v2_client.is_model_ready("features.ln")
    assert v2_client.is_model_ready("features.ln", headers=dict(auth))
    with pytest.raises(InferenceServerException, match="missing bearer token"):
        v2_client.get_model_metadata("features.ln")
    assert v2_client.get_model_metadata("features.ln", headers=dict(auth))["name"] == "features.ln"
    with pytest.raises(InferenceServerException, match="missing bearer token"):
        infer(v2_client, "features.ln", x, "FP32")
    # infer() adds its own headers to the dict it is given: a fresh one per call.
    result = infer(v2_client, "features.ln", x, "FP32", headers=dict(auth))
    assert result.as_numpy("output").shape == (2, 64)


def test_openapi_documents_the_v2_surface(http):
    schema = http.get("/openapi.json").json()
    infer_path = schema["paths"]["/v2/models/{name}/infer"]["post"]
    content = infer_path["requestBody"]["content"]
    assert set(content) == {"application/json", "application/octet-stream"}
    assert "$ref" not in json.dumps(content)  # nested models written out in place
    for path in ("/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/{name}",
                 "/v2/models/{name}/ready", "/v2/models/{name}/versions/{version}/infer"):
        assert path in schema["paths"]
