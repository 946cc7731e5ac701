"""KServe V2 over gRPC against a real server process, through an unmodified
tritonclient.grpc: health, metadata, eval and train infer in every datatype, parity with
torch.nn and with HTTP, the token, errors as status codes with HTTP's messages, request ids,
limits, and typed contents (which tritonclient does not send) through the raw stub."""

from __future__ import annotations

from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.server_process import free_port, service_process

from .test_v2 import LAYERS, check_outputs, stat_names
from .v2_helpers import reference_layer, to_numpy, to_torch

TOKEN = "grpc-test-token-0123456789"
AUTH = {"authorization": f"Bearer {TOKEN}"}
DATATYPES = ["FP32", "FP16", "BF16", "FP64"]


@pytest.fixture(scope="module")
def server():
    grpc_port = free_port()
    env = {"NORMCORE_DEVICE": "cpu", "NORMCORE_API_TOKEN": TOKEN,
           "NORMCORE_MAX_BODY_BYTES": str(1 << 20)}
    with service_process(["--grpc-port", str(grpc_port)], env=env) as proc:
        proc.grpc_url = f"127.0.0.1:{grpc_port}"
        yield proc


@pytest.fixture(scope="module")
def client(server):
    with triton_grpc.InferenceServerClient(server.grpc_url) as c:
        yield c


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, trust_env=False, timeout=60,
                      headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        yield c


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.grpc_url) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def infer(client, model, x: np.ndarray, datatype: str, outputs=None, **kwargs):
    tensor = triton_grpc.InferInput("x", list(x.shape), datatype)
    tensor.set_data_from_numpy(x)
    wanted = None if outputs is None else [triton_grpc.InferRequestedOutput(n) for n in outputs]
    return client.infer(model, [tensor], outputs=wanted, **kwargs)


def _error(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as error:
        call()
    return error.value


# --- health and metadata ----------------------------------------------------------------


def test_server_is_live_and_ready_with_its_metadata(client) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "normcore"
    assert "binary_tensor_data" in meta["extensions"]


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_every_layer_is_a_ready_model_with_the_metadata_http_gives(client, http, name) -> None:
    assert client.is_model_ready(name)
    assert client.is_model_ready(name, "1")
    meta = client.get_model_metadata(name, as_json=True)
    expected = http.get(f"/v2/models/{name}").json()
    for tensors in ("inputs", "outputs"):
        for tensor in expected[tensors]:
            tensor["shape"] = [str(d) for d in tensor["shape"]]  # int64 in JSON: strings
    assert meta == expected


def test_unknown_models_and_versions_are_not_ready(client) -> None:
    assert not client.is_model_ready("no.such.layer")
    assert not client.is_model_ready("features.ln", "2")
    error = _error(lambda: client.get_model_metadata("no.such.layer"))
    assert error.status() == "StatusCode.NOT_FOUND"
    assert "unknown model 'no.such.layer'" in error.message()


# --- infer ------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
@pytest.mark.parametrize("datatype", DATATYPES)
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_eval_matches_torch(client, http, name, datatype) -> None:
    kind, layer = reference_layer(http, name)
    x = torch.randn(LAYERS[name][0], dtype=torch.float64) * 3 + 1
    if datatype != "FP64":
        x = to_torch(to_numpy(x.float(), datatype))
        layer = layer.float()
    else:
        layer = layer.double()
    result = infer(client, name, to_numpy(x, datatype), datatype,
                   outputs=["output", *stat_names(kind)], parameters={"mode": "eval"})
    check_outputs(result, kind, layer, x, datatype)
    response = result.get_response(as_json=True)
    assert response["parameters"]["mode"]["string_param"] == "eval"
    assert response["model_version"] == "1"


def test_default_is_eval_and_the_output_alone(client) -> None:
    result = infer(client, "features.rms", np.ones((2, 64), np.float32), "FP32")
    assert [o.name for o in result.get_response().outputs] == ["output"]


def test_train_updates_running_stats_like_torch_with_the_token(client, http) -> None:
    name = "stream.bn"
    kind, layer = reference_layer(http, name)
    before = http.get(f"/stats/{name}").json()["num_batches_tracked"]
    x = torch.randn(16, 64) * 2 + 3
    result = infer(client, name, x.numpy(), "FP32", outputs=["output", *stat_names(kind)],
                   parameters={"mode": "train"}, headers=AUTH)
    check_outputs(result, kind, layer, x, "FP32", train=True)
    params = result.get_response(as_json=True)["parameters"]
    assert int(params["num_batches_tracked"]["int64_param"]) == before + 1
    stats = http.get(f"/stats/{name}").json()
    np.testing.assert_allclose(stats["running_mean"], layer.running_mean, atol=1e-5)
    np.testing.assert_allclose(stats["running_var"], layer.running_var, rtol=1e-4)


def test_a_retried_request_id_is_applied_once(client, http) -> None:
    x = np.random.default_rng(3).normal(size=(4, 64)).astype(np.float32)
    params = {"mode": "train", "request_id": "grpc-retry-1"}
    first = infer(client, "stream.bn", x, "FP32", parameters=params, headers=AUTH)
    again = infer(client, "stream.bn", x, "FP32", parameters=params, headers=AUTH)
    count = [int(r.get_response(as_json=True)["parameters"]["num_batches_tracked"]
                 ["int64_param"]) for r in (first, again)]
    assert count[0] == count[1] == http.get("/stats/stream.bn").json()["num_batches_tracked"]


@pytest.mark.parametrize(("headers", "status"), [
    (None, "StatusCode.UNAUTHENTICATED"),
    ({"authorization": "Bearer wrong-token"}, "StatusCode.PERMISSION_DENIED"),
])
def test_train_without_the_right_token_is_refused_and_changes_nothing(
    client, http, headers, status
) -> None:
    before = http.get("/stats/stream.bn").json()
    error = _error(lambda: infer(client, "stream.bn", np.ones((2, 64), np.float32), "FP32",
                                 parameters={"mode": "train"}, headers=headers))
    assert error.status() == status
    assert http.get("/stats/stream.bn").json()["num_batches_tracked"] == (
        before["num_batches_tracked"])


def test_errors_carry_the_messages_http_gives(client, server) -> None:
    x = np.ones((2, 63), np.float32)  # stream.bn has 64 channels
    grpc_error = _error(lambda: infer(client, "stream.bn", x, "FP32"))
    assert grpc_error.status() == "StatusCode.INVALID_ARGUMENT"
    http_client = triton_http.InferenceServerClient(server.url.removeprefix("http://"))
    try:
        tensor = triton_http.InferInput("x", [2, 63], "FP32")
        tensor.set_data_from_numpy(x)
        http_error = _error(lambda: http_client.infer("stream.bn", [tensor]))
    finally:
        http_client.close()
    assert grpc_error.message() == http_error.message()
    assert "channels" in grpc_error.message()


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"parameters": {"mode": "fit"}}, "mode must be 'eval' or 'train'"),
    ({"outputs": ["nope"]}, "unknown output"),
    ({"model_version": "3"}, "has no version '3'"),
])
def test_bad_requests_are_invalid_arguments(client, kwargs, words) -> None:
    error = _error(lambda: infer(client, "features.ln", np.ones((1, 64), np.float32), "FP32",
                                 **kwargs))
    assert error.status() in ("StatusCode.INVALID_ARGUMENT", "StatusCode.NOT_FOUND")
    assert words in error.message()


def test_a_message_over_the_body_limit_is_refused(client) -> None:
    x = np.ones((5000, 64), np.float32)  # 1.2 MiB, over the server's 1 MiB
    error = _error(lambda: infer(client, "stream.bn", x, "FP32"))
    assert error.status() == "StatusCode.RESOURCE_EXHAUSTED"


def test_the_request_id_is_honoured_and_logged(stub, server) -> None:
    request = service_pb2.ServerLiveRequest()
    _, call = stub.ServerLive.with_call(request, metadata=(("x-request-id", "grpc-id-1"),))
    assert ("x-request-id", "grpc-id-1") in call.initial_metadata()
    _, call = stub.ServerLive.with_call(request)
    assert dict(call.initial_metadata())["x-request-id"]
    assert "ServerLive OK" in server.log()
    assert "[grpc-id-1]" in server.log()


@pytest.mark.parametrize("datatype", ["FP32", "FP64"])
def test_typed_contents_in_and_out(stub, http, datatype) -> None:
    kind, layer = reference_layer(http, "features.gn")
    x = torch.randn(3, 32, 5, dtype=torch.float64)
    field = {"FP32": "fp32_contents", "FP64": "fp64_contents"}[datatype]
    request = service_pb2.ModelInferRequest(model_name="features.gn")
    tensor = request.inputs.add(name="x", datatype=datatype, shape=[3, 32, 5])
    getattr(tensor.contents, field).extend(x.reshape(-1).tolist())
    request.outputs.add(name="output")
    reply = stub.ModelInfer(request)
    assert not reply.raw_output_contents
    (output,) = reply.outputs
    assert output.datatype == datatype
    got = torch.tensor(list(getattr(output.contents, field)), dtype=torch.float64)
    expected = (layer.double() if datatype == "FP64" else layer)(
        x if datatype == "FP64" else x.float())
    torch.testing.assert_close(got.reshape(3, 32, 5), expected.double().detach(),
                               atol=1e-5, rtol=1e-5)


def test_fp16_has_no_typed_contents(stub) -> None:
    request = service_pb2.ModelInferRequest(model_name="features.ln")
    tensor = request.inputs.add(name="x", datatype="FP16", shape=[1, 64])
    tensor.contents.fp32_contents.extend([0.0] * 64)
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelInfer(request)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "raw_input_contents" in error.value.details()


def test_grpc_calls_are_counted_in_the_metrics(client, http) -> None:
    infer(client, "features.ln", np.ones((1, 64), np.float32), "FP32")
    text = http.get("/metrics").text
    assert 'route="/inference.GRPCInferenceService/ModelInfer"' in text


@pytest.mark.slow
def test_a_grpc_train_step_is_durable(tmp_path) -> None:
    grpc_port = free_port()
    args = ["--grpc-port", str(grpc_port), "--state-dir", str(tmp_path / "state")]
    x = np.random.default_rng(5).normal(size=(8, 64)).astype(np.float32)
    with service_process(args, env={"NORMCORE_DEVICE": "cpu"}) as server:
        with triton_grpc.InferenceServerClient(f"127.0.0.1:{grpc_port}") as client:
            result = infer(client, "stream.bn", x, "FP32", parameters={"mode": "train"})
        count = int(result.get_response(as_json=True)["parameters"]["num_batches_tracked"]
                    ["int64_param"])
        server.kill()  # no graceful stop: the journal alone must hold the step
        server.start()
        stats = httpx.get(f"{server.url}/stats/stream.bn", trust_env=False).json()
    assert stats["num_batches_tracked"] == count


def test_a_grpc_port_that_is_taken_stops_start_up(tmp_path: Path) -> None:
    import socket

    from tests.server_process import ServerError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = service_process(["--grpc-port", str(port)], env={"NORMCORE_DEVICE": "cpu"},
                                 log=tmp_path / "server.log")
        with pytest.raises(ServerError, match="exited"):
            server.start()
    assert "gRPC cannot listen on 127.0.0.1:" in server.log()
