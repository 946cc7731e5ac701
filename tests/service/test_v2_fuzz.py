"""The V2 binary path under fuzzing: generated requests with extreme shapes and dimension
products, and byte-level mutations of real binary bodies (header, lengths, blob, gzip).
Every one gets a 2xx or a 4xx with an ``{"error"}`` body; none a 5xx, and none changes a
layer it was not allowed to."""

from __future__ import annotations

import gzip
import json
import warnings
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from service.app import create_app
from service.settings import Settings

with warnings.catch_warnings():  # starlette nudges towards httpx2, which is not installed
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

pytestmark = pytest.mark.slow

FUZZ = settings(derandomize=True, database=None, deadline=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck))
LAYERS = {"stream.bn": 64, "features.in": 16, "features.gn": 32, "features.ln": 64}
DATATYPES = {"FP32": np.float32, "FP16": np.float16, "FP64": np.float64, "BF16": np.uint16}
ALLOWED = {200, 400, 401, 403, 404, 409, 413, 422}


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(Settings(threads=1, device="cpu")),
                    raise_server_exceptions=False) as c:
        yield c


def _body(shape: list[int], datatype: str, blob: bytes, size: int | None = None,
          mode: str = "eval") -> tuple[bytes, dict[str, str]]:
    header = json.dumps({
        "inputs": [{"name": "x", "shape": shape, "datatype": datatype,
                    "parameters": {"binary_data_size": len(blob) if size is None else size}}],
        "outputs": [{"name": "output", "parameters": {"binary_data": True}}],
        "parameters": {"mode": mode},
    }).encode()
    return header + blob, {"Inference-Header-Content-Length": str(len(header)),
                           "Content-Type": "application/octet-stream"}


def _check(reply) -> int:
    assert reply.status_code in ALLOWED, (reply.status_code, reply.text[:300])
    if reply.status_code >= 400:
        assert set(reply.json()) == {"error"}
        assert len(reply.content) < 1000
    return reply.status_code


_HUGE = st.sampled_from([0, 1, 2**31, 2**32 + 1, 2**62, 2**63 - 1, 2**63, 2**64 - 1])


@st.composite
def _extreme(draw) -> tuple[str, list[int], str, bytes, int | None]:
    layer = draw(st.sampled_from(sorted(LAYERS)))
    rank = draw(st.integers(0, 9))
    shape = draw(st.lists(st.one_of(st.integers(0, 4), _HUGE), min_size=rank, max_size=rank))
    datatype = draw(st.sampled_from(sorted(DATATYPES)))
    blob = draw(st.binary(max_size=512))
    size = draw(st.one_of(st.none(), _HUGE, st.integers(-3, 600)))
    return layer, shape, datatype, blob, size


def test_extreme_shapes_and_sizes_never_get_a_server_error(client) -> None:
    statuses: Counter = Counter()

    @settings(FUZZ, max_examples=300)
    @given(case=_extreme())
    def run(case) -> None:
        layer, shape, datatype, blob, size = case
        body, headers = _body(shape, datatype, blob, size)
        statuses[_check(client.post(f"/v2/models/{layer}/infer", content=body,
                                    headers=headers))] += 1

    run()
    assert statuses[400] > 100


def _valid(layer: str, rows: int = 3) -> tuple[bytes, dict[str, str]]:
    x = np.random.default_rng(rows).standard_normal((rows, LAYERS[layer]), dtype=np.float32)
    return _body(list(x.shape), "FP32", x.tobytes(), mode="train")


@st.composite
def _mutation(draw) -> tuple[str, bytes, dict[str, str]]:
    layer = draw(st.sampled_from(["stream.bn", "features.ln"]))
    body, headers = _valid(layer)
    data = bytearray(body)
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["flip", "cut", "grow", "splice"]))
        where = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[where] ^= 1 << draw(st.integers(0, 7))
        elif kind == "cut":
            del data[where:where + draw(st.integers(1, 64))]
        elif kind == "grow":
            data[where:where] = draw(st.binary(min_size=1, max_size=64))
        else:
            data[where:where + 4] = draw(st.sampled_from(
                [b"1e99", b"-1", b"null", b"[[[[", b'"\\u0', b"\x00\xff", b"9" * 30]))
    headers = dict(headers)
    header_length = draw(st.sampled_from(["keep", "0", "-1", "huge", "junk", "drop"]))
    if header_length == "huge":
        headers["Inference-Header-Content-Length"] = str(2**64)
    elif header_length == "junk":
        headers["Inference-Header-Content-Length"] = "12a"
    elif header_length == "drop":
        del headers["Inference-Header-Content-Length"]
    elif header_length != "keep":
        headers["Inference-Header-Content-Length"] = header_length
    if draw(st.booleans()):
        packed = gzip.compress(bytes(data))
        if draw(st.booleans()):  # a corrupt or truncated gzip stream
            cut = draw(st.integers(0, len(packed)))
            packed = packed[:cut] + draw(st.binary(max_size=8))
        data, headers["Content-Encoding"] = bytearray(packed), "gzip"
    return layer, bytes(data), headers


def test_mutated_binary_bodies_never_get_a_server_error(client) -> None:
    statuses: Counter = Counter()
    before = client.get("/stats").json()["layers"]

    @settings(FUZZ, max_examples=400)
    @given(case=_mutation())
    def run(case) -> None:
        layer, body, headers = case
        statuses[_check(client.post(f"/v2/models/{layer}/infer", content=body,
                                    headers=headers))] += 1

    run()
    assert statuses[400] > 50
    # Every accepted mutation was a train step the server counted; nothing else changed.
    after = client.get("/stats").json()["layers"]
    for layer in ("stream.bn", "features.ln"):
        assert after[layer]["requests"]["train"] - before[layer]["requests"]["train"] <= \
            statuses[200]
    assert {name: entry for name, entry in after.items()
            if name not in ("stream.bn", "features.ln")} == \
        {name: entry for name, entry in before.items()
         if name not in ("stream.bn", "features.ln")}
