"""Bad input over HTTP, in-process: always a JSON 4xx, never a 5xx, never the payload echoed,
and never a change to any layer."""

from __future__ import annotations

import gc
import io
import json
import time
import tracemalloc
import zipfile

import numpy as np
import pytest
import torch

from .conftest import make_client
from .reference import tensor

SENTINEL = "ZQXJ-payload-marker"
ONES = [1.0] * 128


def _layers(client) -> dict:
    return client.get("/stats").json()["layers"]


def _normalize(data, dtype: str = "float32", shape=(2, 64), mode: str = "train") -> bytes:
    """A /normalize body whose tensor data is written verbatim (it may not be JSON)."""
    return (b'{"layer": "stream.bn", "mode": "%s", "tensor": {"shape": %s, "dtype": "%s", '
            b'"data": %s}}' % (mode.encode(), json.dumps(list(shape)).encode(), dtype.encode(),
                               data))


def _data(*head: str) -> bytes:
    """128 values: ``head`` first, then ones."""
    return ("[" + ", ".join([*head, *["1"] * (128 - len(head))]) + "]").encode()


BAD_NUMBERS = {
    "NaN": (_data("NaN"), "float32", "NaN and Infinity"),
    "Infinity": (_data("2", "Infinity"), "float32", "NaN and Infinity"),
    "-Infinity nested": (b"[[-Infinity" + b", 1" * 63 + b"], [" + b"1, " * 63 + b"1]]",
                         "float32", "NaN and Infinity"),
    "1e999": (_data("1e999"), "float32", "overflows to infinity"),
    "-1e400": (_data("-1e400"), "float64", "overflows to infinity"),
    "1e39 in float32": (_data("1e39"), "float32", "overflows float32"),
    "7e4 in float16": (_data("70000"), "float16", "overflows float16"),
    "1e39 in bfloat16": (_data("1e39"), "bfloat16", "overflows bfloat16"),
    "true": (_data("true"), "float32", "not booleans"),
    "nested false": (b"[[false" + b", 1" * 63 + b"], [" + b"1, " * 63 + b"1]]", "float32",
                     "not booleans"),
    "null": (_data("null"), "float32", "list of numbers"),
    "string nan": (_data('"nan"'), "float32", "list of numbers"),
    "string number": (_data('"1.5"'), "float32", "list of numbers"),
    "object": (_data("{}"), "float32", "list of numbers"),
    "ragged": (b"[[1, 2], [3]]", "float32", "list of numbers"),
}


@pytest.mark.parametrize("case", BAD_NUMBERS)
def test_numbers_json_or_the_dtype_cannot_hold_are_422(client, case: str) -> None:
    data, dtype, message = BAD_NUMBERS[case]
    before = _layers(client)
    reply = client.post("/normalize", content=_normalize(data, dtype))
    assert reply.status_code == 422, reply.text
    assert message in reply.json()["error"]
    assert _layers(client)["stream.bn"]["running_mean"] == before["stream.bn"]["running_mean"]


def test_largest_finite_float64_is_accepted(client) -> None:
    reply = client.post("/normalize", content=_normalize(_data("1e308"), "float64", mode="eval"))
    assert reply.status_code == 200, reply.text


def test_deep_nesting_is_a_fast_400(client) -> None:
    start = time.perf_counter()
    reply = client.post("/normalize", content=b"[" * 100_000 + b"]" * 100_000)
    assert reply.status_code == 400
    deep_nan = b'{"layer": "stream.bn", "tensor": {"data": ' + b"[" * 100_000 + b"NaN"
    assert client.post("/normalize", content=deep_nan).status_code == 400
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("junk", [
    b"[" + b"{}," * 5_000_000 + b"{}]",                                    # objects
    b"{" + b",".join(b'"k%d":0' % i for i in range(1_000_000)) + b"}",   # keys
], ids=["objects", "keys"])
def test_a_flood_of_json_objects_or_keys_is_a_fast_400(client, junk: bytes) -> None:
    # Valid JSON in a field nobody reads; parsed, it would hold the GIL for a second.
    body = b'{"layer": "stream.bn", "junk": %s, "tensor": {"shape": [2, 64], "data": %s}}' % (
        junk, b"[" + b"1," * 127 + b"1]")
    assert len(body) < 16 << 20
    start = time.perf_counter()
    reply = client.post("/normalize", content=body)
    assert reply.status_code == 400
    assert "objects and keys" in reply.json()["error"]
    assert time.perf_counter() - start < 0.5


def test_nesting_orjson_accepts_but_numpy_does_not_is_422(client) -> None:
    data = b"[" * 100 + b"1" + b"]" * 100
    reply = client.post("/normalize", content=_normalize(data, shape=(1,), mode="eval"))
    assert reply.status_code == 422


@pytest.mark.parametrize("body", [
    b'{"layer": "stream.bn", "tensor": {"shape": [2, 64], "data": [' + b"1.5, " * 700_000,
    b'{"layer": "' + b"x" * (4 << 20) + b'"',
    b"\xff" * (4 << 20),
])
def test_a_4_mib_invalid_body_is_answered_well_under_a_second(client, body: bytes) -> None:
    start = time.perf_counter()
    reply = client.post("/normalize", content=body)
    elapsed = time.perf_counter() - start
    assert reply.status_code == 400
    assert len(reply.content) < 1000
    assert elapsed < 0.5


@pytest.mark.parametrize(("shape", "message"), [
    ([1] * 9, "rank 9 exceeds the limit of 8"),
    ([1 << 20, 1 << 20], "exceeds the limit of"),
    ([0, 1 << 62], "an empty tensor whose other dims span"),
    ([2, 64.0], "non-negative integers"),
    ([2, True], "non-negative integers"),
])
def test_rank_and_size_limits(client, shape, message: str) -> None:
    reply = client.post("/normalize", json={"layer": "stream.bn",
                                            "tensor": {"shape": shape, "data": []}})
    assert reply.status_code == 422
    assert message in reply.json()["error"]


def test_limits_come_from_the_settings() -> None:
    with make_client(max_rank=2, max_elements=100) as client:
        for shape in ([1, 1, 1], [2, 64]):
            reply = client.post("/normalize", json={"layer": "stream.bn",
                                                    "tensor": {"shape": shape, "data": []}})
            assert reply.status_code == 422
            assert "limit of" in reply.json()["error"]


@pytest.mark.parametrize("dtype", [{}, [], 3, None, "int8"])
def test_dtype_must_be_a_known_name(client, dtype) -> None:
    reply = client.post("/normalize", json={"layer": "stream.bn", "tensor": {
        "shape": [2, 64], "dtype": dtype, "data": ONES}})
    assert reply.status_code == 422


ECHOES = {
    "layer name": ("POST", "/normalize", {"json": {"layer": SENTINEL * 20, "tensor": {}}}),
    "tensor field": ("POST", "/normalize", {"json": {"layer": "stream.bn", "tensor": {
        "shape": [2, 64], "data": ONES, SENTINEL: 1}}}),
    "tensor data": ("POST", "/normalize", {"json": {"layer": "stream.bn", "tensor": {
        "shape": [2, 64], "data": [SENTINEL] * 128}}}),
    "b64": ("POST", "/normalize", {"json": {"layer": "stream.bn", "tensor": {
        "shape": [2, 64], "b64": SENTINEL}}}),
    "mode": ("POST", "/normalize", {"json": {"layer": "stream.bn", "mode": SENTINEL}}),
    "kind": ("PUT", "/layers/a", {"json": {"kind": SENTINEL + "!", "config": {}}}),
    "argument": ("PUT", "/layers/a", {"json": {"kind": "BatchNorm1d",
                                               "config": {SENTINEL + " x": 1}}}),
    "argument value": ("PUT", "/layers/a", {"json": {"kind": "BatchNorm1d",
                                                     "config": {"num_features": SENTINEL}}}),
    "extra field": ("PUT", "/layers/a", {"json": {"kind": "BatchNorm1d", SENTINEL + "?": 1}}),
    "device": ("PUT", "/layers/a", {"json": {"kind": "BatchNorm1d",
                                             "config": {"num_features": 2}, "device": SENTINEL}}),
    "checkpoint": ("PUT", "/layers/a", {"json": {"kind": "BatchNorm1d",
                                                 "config": {"num_features": 2},
                                                 "checkpoint_b64": SENTINEL}}),
    "path name": ("GET", f"/stats/{SENTINEL}%20x", {}),
    "upload": ("PUT", "/layers/stream.bn/state", {"content": SENTINEL.encode() * 100}),
    "malformed JSON": ("POST", "/normalize", {"content": SENTINEL.encode() + b"{"}),
}


@pytest.mark.parametrize("case", ECHOES)
def test_error_bodies_never_echo_the_payload(client, case: str) -> None:
    method, path, kwargs = ECHOES[case]
    before = _layers(client)
    reply = client.request(method, path, **kwargs)
    assert 400 <= reply.status_code < 500, reply.text
    assert set(reply.json()) == {"error"}
    assert SENTINEL not in reply.text
    assert len(reply.json()["error"]) <= 500
    assert _layers(client) == before


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/nope", 404), ("POST", "/layers", 404), ("GET", "/normalize", 405),
    ("DELETE", "/stats", 405), ("PATCH", "/layers/stream.bn", 405), ("POST", "/healthz", 405),
])
def test_unknown_routes_and_methods_are_json_errors(client, method, path, status) -> None:
    reply = client.request(method, path)
    assert reply.status_code == status
    assert reply.headers["content-type"] == "application/json"
    assert set(reply.json()) == {"error"}


@pytest.mark.parametrize("content_type", [
    "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
    "application/json; charset=latin-1", "image/png", "",
])
def test_any_content_type_is_a_4xx_or_a_success_never_a_5xx(client, content_type) -> None:
    headers = {"content-type": content_type}
    body = json.dumps({"layer": "stream.bn", "tensor": tensor(np.ones((2, 64)))}).encode()
    assert client.post("/normalize", content=body, headers=headers).status_code == 200
    assert client.post("/normalize", content=b"a=1&b=2", headers=headers).status_code == 400
    assert client.put("/layers/stream.bn/state", content=b"{}",
                      headers=headers).status_code == 422


def _torch_file() -> bytes:
    buffer = io.BytesIO()
    torch.save(torch.nn.BatchNorm1d(64).state_dict(), buffer)
    return buffer.getvalue()


def _zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("data.pkl", b"\x80\x04N.")
    return buffer.getvalue()


@pytest.mark.parametrize("upload", [_torch_file(), _zip(), b"", b"\x00" * 8])
def test_uploads_are_safetensors_only(client, upload: bytes) -> None:
    before = _layers(client)
    reply = client.put("/layers/stream.bn/state", content=upload)
    assert reply.status_code == 422
    assert "not a valid safetensors file" in reply.json()["error"]
    assert _layers(client) == before


def test_a_request_that_cannot_start_in_time_is_503_and_applies_nothing() -> None:
    with make_client(request_timeout=0.2) as client:
        slot = client.app.state.engine.store.slot("stream.bn")
        before = int(slot.layer.num_batches_tracked)
        slot.lock.acquire()  # another step holds the layer for longer than the timeout
        try:
            start = time.perf_counter()
            reply = client.post("/normalize", json={"layer": "stream.bn", "mode": "train",
                                                    "tensor": tensor(np.ones((2, 64)))})
            waited = time.perf_counter() - start
        finally:
            slot.lock.release()
        assert reply.status_code == 503
        assert "nothing of it was applied" in reply.json()["error"]
        assert 0.15 < waited < 2.0
        assert int(client.app.state.engine.store.slot("stream.bn").layer
                   .num_batches_tracked) == before


def test_a_started_step_finishes_and_is_answered_past_the_timeout() -> None:
    with make_client(request_timeout=0.2) as client:
        engine = client.app.state.engine
        real = engine.normalize

        def slow(*args):
            result = real(*args)
            time.sleep(0.6)  # the step is taken: the reply must say so
            return result

        engine.normalize = slow
        reply = client.post("/normalize", json={"layer": "stream.bn", "mode": "train",
                                                "tensor": tensor(np.ones((2, 64)))})
        assert reply.status_code == 200
        assert reply.json()["num_batches_tracked"] == 1



def test_millions_of_tiny_lists_are_refused_before_parsing(client) -> None:
    # One GIL-holding parse of 4 Mi one-value lists would take seconds and gigabytes.
    data = b"[" + b",".join([b"[0]"] * (1 << 20)) + b"]"
    start = time.perf_counter()
    reply = client.post("/normalize", content=_normalize(data, shape=(1 << 20, 1)))
    assert reply.status_code == 400
    assert "lists" in reply.json()["error"]
    assert time.perf_counter() - start < 1.0


def _refused_bodies() -> dict[str, tuple[str, bytes, dict]]:
    """Three refused requests of about 8 MB: a NaN train step as V2 binary data, a V2
    output too big for JSON, and a NaN train step as base64 on /normalize."""
    x = np.zeros((32768, 64), np.float32)
    x[0, 0] = np.nan

    def v2(parameters: dict) -> tuple[str, bytes, dict]:
        header = json.dumps({"inputs": [{"name": "x", "shape": list(x.shape),
                                          "datatype": "FP32",
                                          "parameters": {"binary_data_size": x.nbytes}}],
                             "parameters": parameters}).encode()
        return ("/v2/models/stream.bn/infer", header + x.tobytes(),
                {"Inference-Header-Content-Length": str(len(header))})

    rest = json.dumps({"layer": "stream.bn", "mode": "train",
                       "tensor": tensor(x, "b64")}).encode()
    return {"v2-nan": v2({"mode": "train", "binary_data_output": True}),
            "v2-json-output": v2({"mode": "eval"}),
            "rest-nan": ("/normalize", rest, {})}


@pytest.mark.parametrize("case", ["v2-nan", "v2-json-output", "rest-nan"])
def test_a_refused_request_lets_its_body_go_at_once(case: str) -> None:
    # The service collects garbage rarely (service.app); a refused body must not wait for
    # a collection, or a few dozen big refused requests hold GBs.
    path, body, headers = _refused_bodies()[case]
    with make_client() as client:
        assert 400 <= client.post(path, content=body, headers=headers).status_code < 500
        gc.disable()
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            for _ in range(5):
                reply = client.post(path, content=body, headers=headers)
                assert 400 <= reply.status_code < 500, reply.text
            held = tracemalloc.get_traced_memory()[0] - base
        finally:
            tracemalloc.stop()
            gc.enable()
    assert held < len(body), f"{held / 1e6:.1f} MB held after 5 refused {case} requests"
