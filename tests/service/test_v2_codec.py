"""The V2 wire format without a server: compression, binary inputs viewed in place,
responses, metadata shapes and the FP64 rule."""

from __future__ import annotations

import gzip
import json
import zlib

import numpy as np
import orjson
import pytest
import torch

from service.core.errors import ServiceError
from service.http.errors import status_of
from service.wire import compression
from service.wire import v2 as codec
from service.wire import v2_types as types
from service.wire.tensors import Limits

OUTPUTS = ("output", "batch_mean", "batch_var")


def _request(header: dict, blob: bytes = b"") -> tuple[bytearray, str]:
    text = json.dumps(header).encode()
    return bytearray(text + blob), str(len(text))


def _binary_input(shape, datatype="FP32", size=None, pad_name="x"):
    return {"inputs": [{"name": pad_name, "shape": list(shape), "datatype": datatype,
                        "parameters": {"binary_data_size": size}}]}


# --- compression ------------------------------------------------------------------------


@pytest.mark.parametrize(("encoding", "pack"), [
    ("gzip", gzip.compress), ("deflate", zlib.compress), ("GZIP", gzip.compress),
    ("identity", bytes), (None, bytes),
])
def test_decompress_undoes_the_content_encoding(encoding, pack):
    body = b"tensor bytes " * 1000
    assert compression.decompress(bytearray(pack(body)), encoding, 1 << 20) == body


def test_decompress_reads_every_gzip_member():
    body = bytearray(gzip.compress(b"head") + gzip.compress(b"blob"))
    assert compression.decompress(body, "gzip", 100) == b"headblob"


def test_decompress_stops_at_the_limit_with_413():
    bomb = bytearray(zlib.compress(bytes(1 << 20)))
    with pytest.raises(ServiceError, match="exceeds the limit of 1000 bytes") as caught:
        compression.decompress(bomb, "deflate", 1000)
    assert status_of(caught.value, "v2") == 413


@pytest.mark.parametrize(("body", "encoding", "message"), [
    (gzip.compress(b"x" * 100)[:-10], "gzip", "truncated"),
    (b"plain", "gzip", "not valid gzip"),
    (zlib.compress(b"x") + b"!", "deflate", "unexpected bytes"),
    (b"x", "br", "unsupported Content-Encoding"),
])
def test_decompress_refuses_bad_bodies_with_400(body, encoding, message):
    with pytest.raises(ServiceError, match=message) as caught:
        compression.decompress(bytearray(body), encoding, 1 << 20)
    assert status_of(caught.value, "v2") == 400


@pytest.mark.parametrize(("accept", "chosen"), [
    (None, None), ("", None), ("gzip", "gzip"), ("deflate", "deflate"), ("br", None),
    ("deflate, gzip", "gzip"), ("gzip;q=0, deflate", "deflate"), ("gzip; q=0.5", "gzip"),
    ("*", None), ("identity", None),
])
def test_response_is_compressed_only_with_an_offered_encoding(accept, chosen):
    assert compression.response_encoding(accept) == chosen


def test_compression_is_used_only_where_it_pays():
    noise = np.random.default_rng(0).standard_normal(1 << 16).astype(np.float32)
    assert not compression.pays([b'{"model_name": "m"}', memoryview(noise).cast("B")])
    assert compression.compress_if_it_pays([memoryview(noise).cast("B")], "gzip") is None
    assert compression.pays([orjson.dumps({"data": noise[:4096]},
                                          option=orjson.OPT_SERIALIZE_NUMPY)])
    assert compression.pays([bytes(1 << 16)])  # zeros
    assert not compression.pays([b""])


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_compress_streams_the_parts(encoding):
    parts = [b"head", memoryview(np.arange(10, dtype=np.float32)).cast("B")]
    inflate = gzip.decompress if encoding == "gzip" else zlib.decompress
    assert inflate(compression.compress(parts, encoding)) == b"head" + bytes(parts[1])


# --- requests ---------------------------------------------------------------------------


@pytest.mark.parametrize("pad", range(8))
@pytest.mark.parametrize("datatype", ["FP16", "FP32", "FP64"])
def test_binary_input_is_an_aligned_view_of_the_body(datatype, pad):
    dtype = {"FP16": np.float16, "FP32": np.float32, "FP64": np.float64}[datatype]
    values = np.arange(12, dtype=dtype).reshape(3, 4)
    # The input name's length moves the blob to every offset modulo 8.
    body, length = _request(_binary_input((3, 4), datatype, values.nbytes, "x" * (pad + 1)),
                            values.tobytes())
    request = codec.decode_infer_request(body, length, OUTPUTS)
    x = codec.decode_input(request, body, Limits())
    assert x.data_ptr() % x.element_size() == 0
    start = np.frombuffer(body, np.uint8).ctypes.data
    assert start <= x.data_ptr() < start + len(body)  # no copy
    np.testing.assert_array_equal(x.numpy(), values)


def test_json_input_may_be_nested():
    body, _ = _request({"inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP16",
                                    "data": [[1, 2], [3, 4]]}]})
    request = codec.decode_infer_request(body, None, OUTPUTS)
    x = codec.decode_input(request, body, Limits())
    assert x.dtype == torch.float16
    assert x.tolist() == [[1, 2], [3, 4]]


def test_request_parameters_and_outputs():
    header = {**_binary_input((1, 2), size=8), "id": "r1",
              "parameters": {"mode": "train", "request_id": "k1", "binary_data_output": True,
                             "priority": 3, "sequence_id": 0},
              "outputs": [{"name": "batch_var", "parameters": {"binary_data": False}},
                          {"name": "output"}]}
    body, length = _request(header, bytes(8))
    request = codec.decode_infer_request(body, length, OUTPUTS)
    assert (request.mode, request.request_id, request.id) == ("train", "k1", "r1")
    assert request.binary_output is True
    assert request.outputs == (codec.RequestedOutput("batch_var", False),
                               codec.RequestedOutput("output", None))


def test_limits_apply_to_binary_inputs():
    body, length = _request(_binary_input((2, 3, 4), size=96), bytes(96))
    request = codec.decode_infer_request(body, length, OUTPUTS)
    with pytest.raises(ServiceError, match="rank 3 exceeds the limit of 2"):
        codec.decode_input(request, body, Limits(max_rank=2))
    with pytest.raises(ServiceError, match="24 elements exceeds the limit of 10"):
        codec.decode_input(request, body, Limits(max_elements=10))


# --- responses --------------------------------------------------------------------------


def _response(request, output, stats):
    head, blobs = codec.encode_infer_response("m", request, output, stats)
    return orjson.loads(head), blobs


def test_response_blobs_follow_the_outputs_order_and_stats_are_fp32():
    header = {**_binary_input((2, 2), "FP64", 32),
              "outputs": [{"name": "batch_mean", "parameters": {"binary_data": True}},
                          {"name": "output", "parameters": {"binary_data": True}},
                          {"name": "batch_var", "parameters": {"binary_data": False}}]}
    body, length = _request(header, bytes(32))
    request = codec.decode_infer_request(body, length, OUTPUTS)
    output = torch.arange(4, dtype=torch.float64).reshape(2, 2)
    stats = {"mean": torch.tensor([1.0, 2.0], dtype=torch.float64),
             "var": torch.tensor([0.5, 0.25], dtype=torch.float64)}
    response, blobs = _response(request, output, stats)
    assert [(o["name"], o["datatype"]) for o in response["outputs"]] == [
        ("batch_mean", "FP32"), ("output", "FP64"), ("batch_var", "FP32")]
    assert [bytes(b) for b in blobs] == [np.float32([1, 2]).tobytes(),
                                         np.arange(4, dtype=np.float64).tobytes()]
    assert response["outputs"][2]["data"] == [0.5, 0.25]


def test_empty_and_bf16_outputs_are_binary():
    body, _ = _request({"inputs": [{"name": "x", "shape": [0, 2], "datatype": "BF16",
                                    "data": []}]})
    request = codec.decode_infer_request(body, None, OUTPUTS)  # JSON output by default
    response, blobs = _response(request, torch.empty(0, 2, dtype=torch.bfloat16), {})
    (output,) = response["outputs"]
    assert output == {"name": "output", "datatype": "BF16", "shape": [0, 2],
                      "parameters": {"binary_data_size": 0}}
    assert [bytes(b) for b in blobs] == [b""]


# --- types ------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "config", "shape", "stats"), [
    ("BatchNorm1d", {"num_features": 3}, [-1, 3], [3]),
    ("BatchNorm2d", {"num_features": 3}, [-1, 3, -1, -1], [3]),
    ("BatchNorm3d", {"num_features": 3}, [-1, 3, -1, -1, -1], [3]),
    ("InstanceNorm1d", {"num_features": 3}, [-1, 3, -1], [-1, 3]),
    ("InstanceNorm3d", {"num_features": 3}, [-1, 3, -1, -1, -1], [-1, 3]),
    ("GroupNorm", {"num_groups": 2, "num_channels": 6}, [-1, 6], [-1, 2]),
    ("LayerNorm", {"normalized_shape": [4, 5]}, [-1, 4, 5], [-1]),
    ("RMSNorm", {"normalized_shape": [5]}, [-1, 5], [-1]),
])
def test_model_metadata_shapes(kind, config, shape, stats):
    meta = types.model_metadata("m", kind, config)
    assert meta["inputs"][0]["shape"] == shape
    assert [o["name"] for o in meta["outputs"]] == list(types.output_names(kind))
    assert meta["outputs"][0]["shape"] == shape
    assert all(o["shape"] == stats for o in meta["outputs"][1:-1])
    assert meta["outputs"][-1] == {"name": "drift", "datatype": "FP32", "shape": [1]}


@pytest.mark.parametrize(("header", "length"), [
    ({"inputs": [{"name": "x", "shape": [1], "datatype": [1], "data": [1.0]}]}, None),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": {}, "data": [1.0]}]}, None),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]}, "9" * 5000),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]}, "١٢"),
])
def test_odd_datatypes_and_header_lengths_are_client_errors(header, length):
    body, _ = _request(header)
    with pytest.raises(ServiceError) as caught:
        codec.decode_infer_request(body, length, OUTPUTS)
    assert status_of(caught.value, "v2") == 400
