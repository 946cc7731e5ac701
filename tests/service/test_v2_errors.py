"""KServe V2 errors against a real server: every v2_client mistake is a 4xx with an
``{"error": ...}`` body, so tritonclient raises an exception carrying the message."""

from __future__ import annotations

import gzip
import json
import zlib

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from .v2_helpers import infer

X = np.random.default_rng(0).standard_normal((4, 64), dtype=np.float32)


def _resized(shape):
    def send(v2_client):
        tensor = triton.InferInput("x", list(X.shape), "FP32")
        tensor.set_data_from_numpy(X)
        tensor.set_shape(shape)  # the blob stays 4 x 64 values
        return v2_client.infer("features.ln", [tensor])
    return send


def _shared_memory(v2_client):
    tensor = triton.InferInput("x", list(X.shape), "FP32")
    tensor.set_shared_memory("region", X.nbytes)
    return v2_client.infer("features.ln", [tensor])


def _two_inputs(v2_client):
    tensors = [triton.InferInput(n, list(X.shape), "FP32") for n in ("a", "b")]
    for tensor in tensors:
        tensor.set_data_from_numpy(X)
    return v2_client.infer("features.ln", tensors)


def _train(name, x):
    return lambda v2_client: infer(v2_client, name, x, "FP32", parameters={"mode": "train"})


# (id, call, status, part of the message)
TRITON_CASES = [
    ("unknown-model", lambda c: infer(c, "no.such.layer", X, "FP32"), "404",
     "unknown model 'no.such.layer'"),
    ("unknown-version", lambda c: infer(c, "features.ln", X, "FP32", model_version="7"),
     "404", "no version '7'"),
    ("metadata-unknown-model", lambda c: c.get_model_metadata("no.such.layer"), "404",
     "unknown model"),
    ("metadata-unknown-version", lambda c: c.get_model_metadata("features.ln", "2"), "404",
     "no version '2'"),
    ("wrong-width", lambda c: infer(c, "features.ln", X[:, :32].copy(), "FP32"), "400",
     "last 1 dims are [64]"),
    ("wrong-rank", lambda c: infer(c, "digits.bn1", X, "FP32"), "400", "expected 4D input"),
    ("wrong-channels", lambda c: infer(c, "features.gn", X.reshape(4, 16, 4), "FP32"), "400",
     "[N, 32, *]"),
    ("int-datatype", lambda c: infer(c, "features.ln", X.astype(np.int32), "INT32"), "400",
     "datatype 'INT32' is not supported"),
    ("binary-size-vs-shape", _resized([5, 64]), "400",
     "binary_data_size is 1024; shape [5, 64] of FP32 needs 1280 bytes"),
    ("unknown-mode", lambda c: infer(c, "features.ln", X, "FP32", parameters={"mode": "fit"}),
     "400", "mode must be 'eval' or 'train'"),
    ("long-request-id", lambda c: infer(c, "features.ln", X, "FP32",
                                        parameters={"request_id": "r" * 129}),
     "400", "request_id must be 1 to 128 characters"),
    ("unknown-output", lambda c: infer(c, "features.ln", X, "FP32", outputs=["batch_std"]),
     "400", "unknown output 'batch_std'"),
    ("mean-of-rmsnorm", lambda c: infer(c, "features.rms", X, "FP32", outputs=["batch_mean"]),
     "400", "this model has output, batch_mean_square"),
    ("shared-memory", _shared_memory, "400", "shared memory is not supported"),
    ("two-inputs", _two_inputs, "400", "exactly one tensor"),
    ("train-one-row", _train("stream.bn", X[:1].copy()), "400",
     "Expected more than 1 value per channel when training"),
    ("train-non-finite", _train("stream.bn", np.full((4, 64), np.nan, np.float32)), "400",
     "non-finite"),
]


@pytest.mark.parametrize(("call", "status", "message"),
                         [pytest.param(*case[1:], id=case[0]) for case in TRITON_CASES])
def test_mistake_reaches_tritonclient_as_an_exception(v2_client, call, status, message):
    with pytest.raises(InferenceServerException) as caught:
        call(v2_client)
    assert caught.value.status() == status
    assert message in caught.value.message()


def _binary_body(shape=(4, 64), size=1024, blob=None, **extra):
    header = json.dumps({"inputs": [{"name": "x", "shape": list(shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": size}}], **extra})
    blob = X.tobytes() if blob is None else blob
    return header.encode() + blob, {"Inference-Header-Content-Length": str(len(header))}


def _json_body(**tensor):
    return json.dumps({"inputs": [{"name": "x", "shape": [4, 64], "datatype": "FP32",
                                   **tensor}]}).encode(), {}


BODY, HEADERS = _binary_body()
JSON_BODY, _ = _json_body(data=X.ravel().tolist())
# (id, body, headers, part of the message)
RAW_CASES = [
    ("malformed-json", b'{"inputs": [', {}, "malformed JSON"),
    ("not-an-object", b"[1, 2]", {}, "must be a JSON object"),
    ("nan-literal", b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", '
     b'"data": [NaN]}]}', {}, "NaN and Infinity"),
    ("no-inputs", b'{"inputs": []}', {}, "exactly one tensor"),
    ("header-length-not-a-number", BODY, {"Inference-Header-Content-Length": "ten"},
     "Inference-Header-Content-Length must be an integer"),
    ("header-length-past-the-body", BODY,
     {"Inference-Header-Content-Length": str(len(BODY) + 1)}, "must be an integer"),
    ("blob-without-header-length", BODY, {}, "malformed JSON"),
    ("bytes-after-the-blob", BODY + b"\0" * 8, HEADERS, "the body holds 1032 bytes"),
    ("blob-cut-short", BODY[:-4], HEADERS, "the body holds 1020 bytes"),
    ("bytes-after-json-input", JSON_BODY + b"xx",
     {"Inference-Header-Content-Length": str(len(JSON_BODY))}, "2 bytes follow the JSON header"),
    ("negative-dim", *_binary_body(shape=(-1, 64)), "shape must be a list of non-negative"),
    ("data-and-binary", *_json_body(data=[0.0] * 256, parameters={"binary_data_size": 1024}),
     "needs exactly one of data or binary_data_size"),
    ("neither-data-nor-binary", *_json_body(), "needs exactly one of data"),
    ("too-few-values", *_json_body(data=[1.0] * 255), "tensor data has 255 values"),
    ("boolean-values", *_json_body(data=[True] * 256), "not booleans"),
    ("string-values", *_json_body(data=["a"] * 256), "list of numbers"),
    ("binary-output-not-bool", *_binary_body(parameters={"binary_data_output": "yes"}),
     "binary_data_output must be true or false"),
    ("header-length-of-5000-digits", BODY, {"Inference-Header-Content-Length": "1" * 5000},
     "Inference-Header-Content-Length must be an integer"),
    ("header-length-not-ascii", BODY, {"Inference-Header-Content-Length": b"\xb2"},
     "Inference-Header-Content-Length must be an integer"),
    ("unsupported-encoding", BODY, {**HEADERS, "Content-Encoding": "br"},
     "unsupported Content-Encoding 'br'"),
    ("corrupt-gzip", b"\x1f\x8b not gzip", {"Content-Encoding": "gzip"}, "not valid gzip"),
    ("truncated-gzip", gzip.compress(BODY)[:-12], {**HEADERS, "Content-Encoding": "gzip"},
     "truncated"),
    ("deflate-with-trailer", zlib.compress(BODY) + b"junk",
     {**HEADERS, "Content-Encoding": "deflate"}, "unexpected bytes after the deflate stream"),
]


@pytest.mark.parametrize(("body", "headers", "message"),
                         [pytest.param(*case[1:], id=case[0]) for case in RAW_CASES])
def test_malformed_request_is_400_with_an_error_body(http, body, headers, message):
    response = http.post("/v2/models/features.ln/infer", content=body, headers=headers)
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/json"
    assert message in response.json()["error"]


def test_rejected_train_request_leaves_stats_unchanged(v2_client, http):
    before = http.get("/stats/stream.bn").json()
    with pytest.raises(InferenceServerException, match="last|expected"):
        infer(v2_client, "stream.bn", X[:, :32].copy(), "FP32", parameters={"mode": "train"})
    after = http.get("/stats/stream.bn").json()
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        assert after[key] == before[key]


def test_body_over_the_limit_is_413(v2_client):
    big = np.zeros((1 << 18, 64), np.float32)  # 64 MiB, plus a header: over the limit
    with pytest.raises(InferenceServerException, match="exceeds the limit") as caught:
        infer(v2_client, "features.ln", big, "FP32")
    assert caught.value.status() == "413"
    assert v2_client.is_server_live()  # the connection and the server carry on


def test_compressed_body_that_inflates_past_the_limit_is_413(v2_client):
    zeros = np.zeros(((1 << 18) + 16, 64), np.float32)  # compresses to ~64 KiB
    with pytest.raises(InferenceServerException, match="decompressed request body") as caught:
        infer(v2_client, "features.ln", zeros, "FP32", request_compression_algorithm="deflate")
    assert caught.value.status() == "413"


def test_a_json_output_past_the_json_limit_is_413_before_any_work(http):
    # 1M values (max_json_bytes / 16, by default) as JSON numbers: about 13 MB of text, from
    # a gzip body of a few KB. As binary data the same request is answered.
    zeros = np.zeros(((1 << 14) + 1, 64), np.float32)
    header = json.dumps({"inputs": [{"name": "x", "shape": list(zeros.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": zeros.nbytes}}],
                         "parameters": {"mode": "train"}})
    before = http.get("/stats/stream.bn").json()
    for binary in (False, True):
        head = header.replace('"mode": "train"}',
                              f'"mode": "train", "binary_data_output": {json.dumps(binary)}}}')
        body = gzip.compress(head.encode() + zeros.tobytes())
        response = http.post("/v2/models/stream.bn/infer", content=body, headers={
            "Content-Encoding": "gzip", "Inference-Header-Content-Length": str(len(head))})
        if binary:
            assert response.status_code == 200, response.text
            continue
        assert response.status_code == 413, response.text
        assert "too big for JSON" in response.json()["error"]
        assert http.get("/stats/stream.bn").json() == before  # not even a step taken


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/v2/models/features.ln/infer", 405),
    ("POST", "/v2/models/features.ln", 405),
    ("GET", "/v2/models/features.ln/labels", 404),
])
def test_unknown_routes_answer_with_an_error_body(http, method, path, status):
    response = http.request(method, path)
    assert response.status_code == status
    assert isinstance(response.json()["error"], str)
