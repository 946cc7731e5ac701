"""POST /normalize in-process: numbers equal torch.nn, encodings, and every error."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import zlib

import numpy as np
import pytest
import torch

from .conftest import make_client
from .reference import array, tensor, twin_of

RNG = np.random.default_rng(0)

SHAPES = {
    "digits.bn1": (4, 16, 5, 5), "digits.head.bn": (8, 64), "features.ln": (3, 7, 64),
    "features.rms": (5, 64), "features.gn": (2, 32, 9), "features.in": (3, 16, 10),
    "stream.bn": (16, 64),
}


def _post(client, layer, x, mode="eval", **extra):
    return client.post("/normalize", json={"layer": layer, "mode": mode,
                                           "tensor": tensor(x, extra.pop("encoding", "list")),
                                           **extra})


@pytest.mark.parametrize("layer", SHAPES)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_output_and_stats_equal_torch(client, layer: str, mode: str) -> None:
    reference = twin_of(client, layer).train(mode == "train")
    counted = getattr(reference, "num_batches_tracked", None)
    start = None if counted is None else int(counted)
    for step in range(3):
        x = RNG.normal(1.5, 2.0, SHAPES[layer]).astype(np.float32)
        reply = _post(client, layer, x, mode)
        assert reply.status_code == 200, reply.text
        body = reply.json()
        with torch.no_grad():
            expected = reference(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(array(body["output"]), expected, atol=1e-5)
        assert body["layer"] == layer
        assert body["mode"] == mode
        stats = {k: array(v) for k, v in body["batch_stats"].items()}
        if layer == "features.rms":
            mean_square = (x.astype(np.float64) ** 2).mean(-1)
            np.testing.assert_allclose(stats["mean_square"], mean_square, rtol=1e-5)
        elif layer in ("digits.bn1", "digits.head.bn", "stream.bn"):
            dims = (0, *range(2, x.ndim))
            np.testing.assert_allclose(stats["mean"], x.mean(dims), atol=1e-5)
            np.testing.assert_allclose(stats["var"], x.var(dims), rtol=1e-4)
        if mode == "train":
            expected_count = None if start is None else start + step + 1
            assert body["num_batches_tracked"] == expected_count
        else:
            assert "num_batches_tracked" not in body
    entry = client.get(f"/stats/{layer}").json()
    if getattr(reference, "running_mean", None) is not None:
        np.testing.assert_allclose(entry["running_mean"], reference.running_mean, atol=1e-6)
        np.testing.assert_allclose(entry["running_var"], reference.running_var, rtol=1e-5)
    assert entry["requests"][mode] == 3


def test_b64_round_trip_and_output_encoding_override(client) -> None:
    x = RNG.normal(size=(4, 64)).astype(np.float32)
    body = _post(client, "features.ln", x, encoding="b64").json()
    assert "b64" in body["output"]
    assert "b64" in body["batch_stats"]["mean"]
    np.testing.assert_allclose(array(body["output"]),
                               torch.nn.functional.layer_norm(torch.from_numpy(x), [64]).numpy(),
                               atol=1e-5)
    listed = _post(client, "features.ln", x, encoding="b64", output_encoding="list").json()
    np.testing.assert_allclose(array(listed["output"]), array(body["output"]))


def test_nested_and_flat_data_agree(client) -> None:
    x = RNG.normal(size=(2, 64)).astype(np.float32)
    flat = {"shape": [2, 64], "data": x.reshape(-1).tolist()}
    nested = {"shape": [2, 64], "data": x.tolist()}
    a = client.post("/normalize", json={"layer": "features.ln", "tensor": flat}).json()
    b = client.post("/normalize", json={"layer": "features.ln", "tensor": nested}).json()
    assert a["output"] == b["output"]
    assert a["mode"] == "eval"


@pytest.mark.parametrize(("dtype", "np_dtype", "atol"), [
    ("float16", "<f2", 2e-3), ("float64", "<f8", 1e-12), ("bfloat16", None, 2e-2),
])
def test_dtypes_keep_the_input_dtype(client, dtype, np_dtype, atol) -> None:
    x = torch.randn(4, 64)
    if dtype == "bfloat16":
        raw = x.to(torch.bfloat16).view(torch.int16).numpy().tobytes()
        xin = x.to(torch.bfloat16)
    else:
        raw = x.numpy().astype(np_dtype).tobytes()
        xin = x.to(getattr(torch, dtype))
    obj = {"shape": [4, 64], "dtype": dtype, "b64": base64.b64encode(raw).decode()}
    body = client.post("/normalize", json={"layer": "features.ln", "tensor": obj}).json()
    assert body["output"]["dtype"] == dtype
    out = base64.b64decode(body["output"]["b64"])
    if dtype == "bfloat16":
        got = torch.frombuffer(bytearray(out), dtype=torch.bfloat16).float().reshape(4, 64)
    else:
        got = torch.from_numpy(np.frombuffer(out, dtype=np_dtype).reshape(4, 64).copy()).float()
    # float64 is computed in float64; half types against float32 state, as torch.nn does.
    wide = xin if dtype == "float64" else xin.float()
    expected = torch.nn.functional.layer_norm(wide, [64]).float()
    torch.testing.assert_close(got, expected, atol=atol, rtol=atol)
    # Statistics are accumulated in float32 at least (float64 input keeps float64).
    assert body["batch_stats"]["mean"]["dtype"] == ("float64" if dtype == "float64" else "float32")


def _stats(client, layer):
    entry = client.get(f"/stats/{layer}").json()
    return entry["running_mean"], entry["running_var"], entry["num_batches_tracked"]


BAD_REQUESTS = [
    (404, "unknown layer", {"layer": "nope", "tensor": {"shape": [2, 64], "data": [0] * 128}}),
    (422, "mode", {"layer": "stream.bn", "mode": "fit",
                   "tensor": {"shape": [2, 64], "data": [0] * 128}}),
    (422, "layer is required", {"tensor": {"shape": [2, 64], "data": [0] * 128}}),
    (422, "channels", {"layer": "stream.bn", "mode": "train",
                       "tensor": {"shape": [2, 63], "data": [0] * 126}}),
    (422, "expected 2D or 3D", {"layer": "stream.bn", "mode": "train",
                                "tensor": {"shape": [128], "data": [0] * 128}}),
    (422, "more than 1 value", {"layer": "stream.bn", "mode": "train",
                                "tensor": {"shape": [1, 64], "data": [0] * 64}}),
    (422, "dtype", {"layer": "stream.bn", "mode": "train",
                    "tensor": {"shape": [2, 64], "dtype": "int8", "data": [0] * 128}}),
    (422, "shape [2, 64] needs 128", {"layer": "stream.bn", "mode": "train",
                                      "tensor": {"shape": [2, 64], "data": [0] * 127}}),
    (422, "shape", {"layer": "stream.bn", "mode": "train",
                    "tensor": {"shape": [2, -64], "data": [0] * 128}}),
    (422, "booleans", {"layer": "stream.bn", "mode": "train",
                       "tensor": {"shape": [2, 64], "data": [True] + [0] * 127}}),
    (422, "overflows float32", {"layer": "stream.bn", "mode": "train",
                                "tensor": {"shape": [2, 64], "data": [1e39] + [0] * 127}}),
    (422, "exactly one of data or b64", {"layer": "stream.bn", "mode": "train",
                                         "tensor": {"shape": [2, 64]}}),
    (422, "not valid base64", {"layer": "stream.bn", "mode": "train",
                               "tensor": {"shape": [2, 64], "b64": "!!"}}),
    (422, "bytes are", {"layer": "stream.bn", "mode": "train",
                        "tensor": {"shape": [2, 64], "b64": "AAAA"}}),
    (422, "non-finite", {"layer": "stream.bn", "mode": "train", "tensor": {
        "shape": [2, 64], "b64": base64.b64encode(
            np.r_[np.float32(np.nan), np.zeros(127, np.float32)].astype("<f4").tobytes()
        ).decode()}}),
]


@pytest.mark.parametrize(("status", "message", "body"), BAD_REQUESTS,
                         ids=[m for _, m, _ in BAD_REQUESTS])
def test_rejected_request_is_a_clear_error_and_changes_nothing(client, status, message, body):
    before = _stats(client, "stream.bn")
    reply = client.post("/normalize", json=body)
    assert reply.status_code == status, reply.text
    assert message in reply.json()["error"]
    assert _stats(client, "stream.bn") == before


@pytest.mark.parametrize("raw", [b"{bad", b"", b"[1, 2", b"\xff\xfe"])
def test_malformed_json_is_400(client, raw: bytes) -> None:
    reply = client.post("/normalize", content=raw)
    assert reply.status_code == 400
    assert "malformed JSON" in reply.json()["error"]


@pytest.mark.parametrize("number", [b"NaN", b"Infinity", b"-Infinity", b"1e999"])
def test_non_finite_json_numbers_are_422_without_echo(client, number: bytes) -> None:
    raw = b'{"layer": "features.ln", "tensor": {"shape": [1, 64], "data": [' + number + \
        b"" + b", 0" * 63 + b"]}}"
    reply = client.post("/normalize", content=raw)
    assert reply.status_code == 422
    error = reply.json()["error"]
    assert "data" not in error
    assert "0, 0" not in error


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_a_compressed_body_is_read_as_its_content_encoding_says(client, encoding) -> None:
    body = json.dumps({"layer": "stream.bn", "tensor": tensor(np.ones((2, 64)))}).encode()
    packed = gzip.compress(body) if encoding == "gzip" else zlib.compress(body)
    plain = client.post("/normalize", content=body)
    reply = client.post("/normalize", content=packed, headers={"Content-Encoding": encoding})
    assert reply.status_code == 200, reply.text
    assert reply.json()["output"] == plain.json()["output"]
    unknown = client.post("/normalize", content=packed, headers={"Content-Encoding": "br"})
    assert unknown.status_code == 422
    assert "unsupported Content-Encoding" in unknown.json()["error"]


def test_base64_in_and_json_numbers_out_is_capped_before_any_work(client) -> None:
    # 1M float32 values (max_json_bytes / 16) as JSON numbers: 13 MB of text from a gzip
    # body of 6 KB. Asked for as base64, or sent as JSON numbers itself, it is answered.
    x = np.zeros(((1 << 14) + 1, 64), np.float32)
    body = {"layer": "stream.bn", "mode": "train", "tensor": tensor(x, "b64")}
    before = client.get("/stats/stream.bn").json()
    packed = gzip.compress(json.dumps({**body, "output_encoding": "list"}).encode())
    reply = client.post("/normalize", content=packed, headers={"Content-Encoding": "gzip"})
    assert reply.status_code == 413, reply.text
    assert "output_encoding b64" in reply.json()["error"]
    assert client.get("/stats/stream.bn").json() == before  # no step taken
    assert client.post("/normalize", json=body).status_code == 200


def test_a_big_json_body_waits_its_turn_at_most_the_request_timeout() -> None:
    with make_client(request_timeout=0.2) as client:
        client.app.state.json_gate = asyncio.Semaphore(0)  # another body's turn, for ever
        big = {"layer": "stream.bn", "tensor": tensor(np.ones((1024, 64)))}
        reply = client.post("/normalize", json=big)
        assert reply.status_code == 503, reply.text
        assert "could not start within the request timeout" in reply.json()["error"]
        small = {"layer": "stream.bn", "tensor": tensor(np.ones((2, 64)))}
        assert client.post("/normalize", json=small).status_code == 200  # not queued


def test_non_object_body_is_422(client) -> None:
    reply = client.post("/normalize", json=[1, 2, 3])
    assert reply.status_code == 422
    assert "JSON object" in reply.json()["error"]


def test_body_over_the_limit_is_413() -> None:
    from .conftest import make_client

    with make_client(max_body_bytes=1000) as small:
        reply = small.post("/normalize", json={"layer": "features.ln", "tensor": {
            "shape": [4, 64], "data": [0.5] * 256}})
        assert reply.status_code == 413
        assert "limit of 1000 bytes" in reply.json()["error"]


def test_eval_changes_nothing(client) -> None:
    before = _stats(client, "digits.bn1")
    x = RNG.normal(size=(4, 16, 3, 3)).astype(np.float32)
    assert _post(client, "digits.bn1", x).status_code == 200
    assert _stats(client, "digits.bn1") == before


@pytest.mark.parametrize("layer", SHAPES)
def test_kernels_switched_off_give_the_same_numbers(layer: str) -> None:
    from normcore import kernels

    from .conftest import make_client

    x = RNG.normal(1.5, 2.0, SHAPES[layer]).astype(np.float32)
    with make_client() as on:
        fast = _post(on, layer, x, "train").json()
    try:
        with make_client(kernels=False) as off:
            assert not kernels.enabled()
            plain = _post(off, layer, x, "train").json()
    finally:
        kernels.set_enabled(True)
    np.testing.assert_allclose(array(fast["output"]), array(plain["output"]), atol=1e-5)
    for name, value in plain["batch_stats"].items():
        np.testing.assert_allclose(array(fast["batch_stats"][name]), array(value), atol=1e-5,
                                   rtol=1e-5)
