"""The service with its layers on a CUDA device, against torch.nn on the CPU: /normalize and
V2 binary infer (eval and train, float32 and half types), running statistics after train
steps, a state dir written on the GPU and restored, refused requests, devices that do not
exist, and one real server process. Skipped where torch sees no CUDA device."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import safetensors.torch
import torch
from fastapi.testclient import TestClient

from tests.server_process import ServerError, service_process

from .conftest import make_client
from .reference import twin_of
from .v2_helpers import batch_stats

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    # torch's RMSNorm warns that half inputs on float32 weights skip its fused kernel (as in
    # tests/normcore/test_parity.py); under -W error that warning would fail the request.
    pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight"),
]

DEVICE = "cuda"
DEVICE_TYPE = torch.device(DEVICE).type
SHAPES = {
    "digits.bn1": (8, 16, 5, 5), "digits.head.bn": (16, 64), "stream.bn": (32, 64),
    "features.ln": (3, 7, 64), "features.gn": (4, 32, 9), "features.rms": (5, 64),
    "features.in": (3, 16, 10),
}
BATCH_NORMS = ("digits.bn1", "digits.head.bn", "stream.bn")
# dtype -> (atol, rtol) of outputs against torch.nn fed the same (rounded) values in float32
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3),
              torch.bfloat16: (2e-2, 2e-2)}
WIRE = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
V2_TYPES = {torch.float32: "FP32", torch.float16: "FP16", torch.bfloat16: "BF16"}
FROM_V2 = {v: k for k, v in V2_TYPES.items()}


@pytest.fixture(scope="module")
def gpu() -> Iterator[TestClient]:
    """The app in-process on the CUDA device, default catalog, shared by the module's tests
    (each reads the state it starts from)."""
    with make_client(device=DEVICE) as client:
        yield client


# --- helpers ----------------------------------------------------------------------------


def sample(shape, step: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inputs whose mean and spread move with ``step``, rounded to ``dtype``."""
    return (torch.randn(shape) * (1.5 + step) + 0.5 * step - 1).to(dtype)


def to_wire(x: torch.Tensor) -> dict:
    raw = x.contiguous().view(torch.uint8).numpy().tobytes()
    return {"shape": list(x.shape), "dtype": WIRE[x.dtype], "b64": base64.b64encode(raw).decode()}


def from_wire(obj: dict) -> torch.Tensor:
    dtype = {v: k for k, v in WIRE.items()}.get(obj["dtype"], torch.float64)
    raw = base64.b64decode(obj["b64"])
    return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(obj["shape"]).clone()


def normalize(http, layer: str, x: torch.Tensor, mode: str, **extra) -> dict:
    reply = http.post("/normalize", json={"layer": layer, "mode": mode, "tensor": to_wire(x),
                                          "output_encoding": "b64", **extra})
    assert reply.status_code == 200, reply.text
    return reply.json()


def expected_stats(kind: str, layer: torch.nn.Module, x: torch.Tensor) -> dict:
    """What the layer normalizes ``x`` with, in float64 (biased variance), by /normalize
    name (V2's names without ``batch_``)."""
    return {name.removeprefix("batch_"): value
            for name, value in batch_stats(kind, layer, x).items()}


def check_step(got: torch.Tensor, stats: dict, reference: torch.nn.Module, x: torch.Tensor,
               train: bool) -> None:
    """``got`` and ``stats`` are what the service answered for ``x``; ``reference`` (on the
    CPU, in float32) takes the same step."""
    atol, rtol = TOLERANCES[x.dtype]
    with torch.no_grad():
        expected = reference.train(train)(x.float())
    reference.eval()
    assert got.dtype == x.dtype
    torch.testing.assert_close(got.float(), expected, atol=atol, rtol=rtol)
    kind = type(reference).__name__
    wanted = expected_stats(kind, reference, x)
    assert set(stats) == set(wanted)
    for name, value in wanted.items():
        torch.testing.assert_close(stats[name].double(), value, atol=1e-4, rtol=1e-4)


def tracks(layer: torch.nn.Module) -> bool:
    return getattr(layer, "num_batches_tracked", None) is not None


def check_running_stats(http, name: str, reference: torch.nn.Module) -> None:
    entry = http.get(f"/stats/{name}").json()
    if getattr(reference, "running_mean", None) is None:
        assert entry.get("running_mean") is None
        return
    for key in ("running_mean", "running_var"):
        torch.testing.assert_close(torch.tensor(entry[key], dtype=torch.float64),
                                   getattr(reference, key).double(), atol=1e-6, rtol=1e-5)
    assert entry["num_batches_tracked"] == int(reference.num_batches_tracked)


def v2_infer(http, layer: str, x: torch.Tensor, mode: str) -> tuple[dict, dict]:
    """A V2 infer with ``x`` as binary data, every output asked for in binary; returns the
    response's JSON header and its outputs by name."""
    stats = ["batch_mean_square"] if layer == "features.rms" else ["batch_mean", "batch_var"]
    blob = x.contiguous().view(torch.uint8).numpy().tobytes()
    header = json.dumps({
        "inputs": [{"name": "x", "shape": list(x.shape), "datatype": V2_TYPES[x.dtype],
                    "parameters": {"binary_data_size": len(blob)}}],
        "outputs": [{"name": n, "parameters": {"binary_data": True}} for n in ["output", *stats]],
        "parameters": {"mode": mode},
    }).encode()
    reply = http.post(f"/v2/models/{layer}/infer", content=header + blob,
                      headers={"Inference-Header-Content-Length": str(len(header))})
    assert reply.status_code == 200, reply.text
    length = int(reply.headers["inference-header-content-length"])
    response = json.loads(reply.content[:length])
    outputs, offset = {}, length
    for out in response["outputs"]:
        size = out["parameters"]["binary_data_size"]
        raw = bytearray(reply.content[offset:offset + size])
        outputs[out["name"]] = torch.frombuffer(raw, dtype=FROM_V2[out["datatype"]]).reshape(
            out["shape"])
        offset += size
    assert offset == len(reply.content)
    return response, outputs


def snapshot(http, name: str) -> tuple[dict, dict]:
    """(the layer's /stats entry less its counters, its state tensors)."""
    entry = http.get(f"/stats/{name}").json()
    for key in ("requests", "rejected", "last_update", "drift"):
        entry.pop(key, None)
    return entry, safetensors.torch.load(http.get(f"/layers/{name}/state").content)


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# --- the catalog on the device ------------------------------------------------------------


def test_every_catalog_layer_is_resident_on_cuda(gpu) -> None:
    body = gpu.get("/stats").json()
    assert body["server"]["default_device"] == DEVICE
    assert set(SHAPES) <= set(body["layers"])
    assert {entry["device"] for entry in body["layers"].values()} == {DEVICE}
    for name, slot in gpu.app.state.engine.store:
        tensors = [*slot.layer.parameters(), *slot.layer.buffers()]
        assert {t.device.type for t in tensors} <= {DEVICE_TYPE}, name
        assert tensors or name not in BATCH_NORMS, name


# --- /normalize and V2 against torch.nn on the CPU -------------------------------------------


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("layer", SHAPES)
def test_normalize_matches_torch_on_the_cpu(gpu, layer: str, mode: str) -> None:
    reference = twin_of(gpu, layer).eval()
    for step in range(4):
        x = sample(SHAPES[layer], step)
        body = normalize(gpu, layer, x, mode)
        stats = {k: from_wire(v) for k, v in body["batch_stats"].items()}
        check_step(from_wire(body["output"]), stats, reference, x, mode == "train")
        if mode == "train" and tracks(reference):
            assert body["num_batches_tracked"] == int(reference.num_batches_tracked)
    check_running_stats(gpu, layer, reference)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("layer", ["digits.bn1", "stream.bn", "features.ln", "features.gn"])
def test_half_inputs_match_torch_in_float32(gpu, layer: str, mode: str, dtype) -> None:
    reference = twin_of(gpu, layer).eval()
    for step in range(3):
        x = sample(SHAPES[layer], step, dtype)
        body = normalize(gpu, layer, x, mode)
        assert body["output"]["dtype"] == WIRE[dtype]
        stats = {k: from_wire(v) for k, v in body["batch_stats"].items()}
        assert {v.dtype for v in stats.values()} == {torch.float32}
        check_step(from_wire(body["output"]), stats, reference, x, mode == "train")
    check_running_stats(gpu, layer, reference)


@pytest.mark.parametrize("layer", BATCH_NORMS)
def test_running_statistics_after_many_train_steps_equal_torch(gpu, layer: str) -> None:
    reference = twin_of(gpu, layer).eval()
    for step in range(12):
        x = sample((step % 3 + 2, *SHAPES[layer][1:]), step)
        normalize(gpu, layer, x, "train")
        with torch.no_grad():
            reference.train()(x)
    reference.eval()
    check_running_stats(gpu, layer, reference)
    served = safetensors.torch.load(gpu.get(f"/layers/{layer}/state").content)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(served[key], value, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", list(V2_TYPES), ids=str)
@pytest.mark.parametrize("layer", ["digits.bn1", "stream.bn", "features.gn", "features.rms"])
def test_v2_binary_infer_matches_torch(gpu, layer: str, dtype) -> None:
    reference = twin_of(gpu, layer).eval()
    for step, mode in enumerate(["eval", "train", "train", "eval"]):
        x = sample(SHAPES[layer], step, dtype)
        response, outputs = v2_infer(gpu, layer, x, mode)
        stats = {k.removeprefix("batch_"): v for k, v in outputs.items() if k != "output"}
        check_step(outputs["output"], stats, reference, x, mode == "train")
        if mode == "train" and tracks(reference):
            tracked = response["parameters"]["num_batches_tracked"]
            assert tracked == int(reference.num_batches_tracked)
    check_running_stats(gpu, layer, reference)


# --- refused requests change nothing --------------------------------------------------------


def test_refused_train_requests_change_nothing(gpu) -> None:
    nan = torch.zeros(4, 64)
    nan[1, 7] = float("nan")
    refused = {"channels": torch.zeros(4, 63), "rank": torch.zeros(64),
               "one value per channel": torch.zeros(1, 64), "non-finite": nan}
    before = snapshot(gpu, "stream.bn")
    rejected = gpu.get("/stats/stream.bn").json()["rejected"]
    for why, x in refused.items():
        reply = gpu.post("/normalize", json={"layer": "stream.bn", "mode": "train",
                                             "tensor": to_wire(x)})
        assert reply.status_code == 422, why
        after = snapshot(gpu, "stream.bn")
        assert after[0] == before[0], why
        assert_same_state(after[1], before[1])
    assert gpu.get("/stats/stream.bn").json()["rejected"] == rejected + len(refused)
    # The layer still trains as torch.nn does, from the state it had.
    reference = twin_of(gpu, "stream.bn").eval()
    x = sample((8, 64), 1)
    body = normalize(gpu, "stream.bn", x, "train")
    stats = {k: from_wire(v) for k, v in body["batch_stats"].items()}
    check_step(from_wire(body["output"]), stats, reference, x, True)
    check_running_stats(gpu, "stream.bn", reference)


# --- devices that do not exist --------------------------------------------------------------


def test_a_missing_cuda_device_is_a_clear_error(gpu) -> None:
    missing = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(ValueError, match=f"device {missing} does not exist here"):
        make_client(device=missing)
    reply = gpu.put("/layers/gpu.missing", json={
        "kind": "BatchNorm1d", "config": {"num_features": 4}, "device": missing})
    assert reply.status_code == 422
    assert "does not exist here" in reply.text
    assert gpu.get("/stats/gpu.missing").status_code == 404
    # The first device by its index serves.
    reply = gpu.put("/layers/gpu.first", json={
        "kind": "BatchNorm1d", "config": {"num_features": 4}, "device": "cuda:0"})
    assert reply.status_code == 200, reply.text
    assert gpu.get("/stats/gpu.first").json()["device"] == "cuda:0"
    x = sample((6, 4), 2)
    body = normalize(gpu, "gpu.first", x, "train")
    expected = torch.nn.BatchNorm1d(4)(x)
    torch.testing.assert_close(from_wire(body["output"]), expected.detach(), atol=1e-5,
                               rtol=1e-5)
    assert gpu.delete("/layers/gpu.first").status_code == 200


# --- a state dir on the device ------------------------------------------------------------


def test_state_dir_restores_what_was_trained_on_cuda(tmp_path: Path) -> None:
    layers = ["digits.bn1", "digits.head.bn", "stream.bn"]
    with make_client(device=DEVICE, state_dir=tmp_path) as client:
        for step in range(5):
            for name in layers:
                normalize(client, name, sample(SHAPES[name], step), "train",
                          request_id=f"{name}-{step}")
        trained = {name: snapshot(client, name) for name in layers}
    assert trained["stream.bn"][0]["num_batches_tracked"] == 5
    for device in (DEVICE, "cpu"):  # the state dir does not depend on the device
        with make_client(device=device, state_dir=tmp_path) as client:
            for name in layers:
                entry, state = snapshot(client, name)
                assert entry == {**trained[name][0], "device": device}, name
                assert_same_state(state, trained[name][1])
    # Reopened on the GPU, training goes on from the restored state as torch.nn would.
    with make_client(device=DEVICE, state_dir=tmp_path) as client:
        reference = twin_of(client, "digits.bn1").eval()
        x = sample(SHAPES["digits.bn1"], 9)
        body = normalize(client, "digits.bn1", x, "train")
        stats = {k: from_wire(v) for k, v in body["batch_stats"].items()}
        check_step(from_wire(body["output"]), stats, reference, x, True)
        check_running_stats(client, "digits.bn1", reference)


# --- a real server process ----------------------------------------------------------------


def test_server_process_on_cuda_trains_and_evaluates_like_torch() -> None:
    with service_process(env={"NORMCORE_DEVICE": DEVICE}, ready_timeout=240) as server, \
            httpx.Client(base_url=server.url, trust_env=False, timeout=60) as http:
        assert http.get("/stats").json()["server"]["default_device"] == DEVICE
        reference = twin_of(http, "digits.bn1").eval()
        for step, mode in enumerate(["train", "train", "train", "eval"]):
            x = sample(SHAPES["digits.bn1"], step)
            body = normalize(http, "digits.bn1", x, mode)
            stats = {k: from_wire(v) for k, v in body["batch_stats"].items()}
            check_step(from_wire(body["output"]), stats, reference, x, mode == "train")
        check_running_stats(http, "digits.bn1", reference)
        x = sample(SHAPES["stream.bn"], 1, torch.float16)
        reference = twin_of(http, "stream.bn").eval()
        _, outputs = v2_infer(http, "stream.bn", x, "train")
        stats = {k.removeprefix("batch_"): v for k, v in outputs.items() if k != "output"}
        check_step(outputs["output"], stats, reference, x, True)
        check_running_stats(http, "stream.bn", reference)


def test_server_process_on_a_missing_device_says_so(tmp_path: Path) -> None:
    missing = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(ServerError, match=f"device {missing} does not exist here"):
        service_process(env={"NORMCORE_DEVICE": missing}, ready_timeout=120,
                        log=tmp_path / "server.log").start()
