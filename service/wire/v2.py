"""V2 infer requests and responses <-> tensors, with the binary tensor data extension.

A body is a JSON header followed by the raw bytes of each binary tensor, back to back::

    body = HEADER || BLOB_0 || ... || BLOB_k       Inference-Header-Content-Length: len(HEADER)

Without that header line the whole body is JSON. Request blobs follow the order of
``inputs``, response blobs the order of ``outputs``; gzip or deflate wraps the whole body
(``wire.compression``).
A blob is little-endian and row-major, which is what ``wire.tensors`` reads and writes
without copying. Mistakes raise ``InvalidRequestError`` naming the problem.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..core.drift import Drift
from ..core.engine import MODES
from ..core.errors import InvalidRequestError, shown
from .tensors import (
    DTYPE_NAMES,
    DTYPES,
    Limits,
    check_json_output,
    check_shape,
    decode_tensor,
    dumps,
    encode_tensor,
    from_bytes,
    parse_json,
    to_bytes,
)
from .v2_types import DATATYPE_OF, DATATYPES, DRIFT, OUTPUT, stat_output


def _bad(message: str) -> InvalidRequestError:
    return InvalidRequestError(message)


# --- requests ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool | None  # None: the request-level binary_data_output decides


@dataclass(frozen=True)
class InferRequest:
    """The JSON header of an infer request, checked; the tensor is decoded separately."""

    input_name: str
    datatype: str  # FP32, FP16, BF16 or FP64
    shape: list[int]
    data: Any  # the JSON values, or None for a binary input
    binary_size: int | None
    blob_offset: int  # where the binary input starts in the body
    mode: str  # eval or train
    request_id: str | None
    id: str | None
    outputs: tuple[RequestedOutput, ...]
    binary_output: bool

    def binary(self, wanted: RequestedOutput) -> bool:
        """Whether ``wanted`` goes as binary data: its own binary_data, else the request's
        binary_data_output."""
        return self.binary_output if wanted.binary is None else wanted.binary


def header_length(value: str | None, body_length: int) -> int:
    """The JSON header's length by Inference-Header-Content-Length (the whole body without
    one); 400 unless it is an integer from 0 to the body's length."""
    if value is None:
        return body_length
    if not re.fullmatch(r"[0-9]{1,19}", value.strip()) or int(value) > body_length:
        raise _bad(f"Inference-Header-Content-Length must be an integer from 0 to the body "
                   f"length ({body_length})")
    return int(value)


def _object(value: Any, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad(f"{what} must be a JSON object")
    return value


def _string(params: dict, key: str, default: str | None) -> str | None:
    value = params.get(key, default)
    if value is not None and not isinstance(value, str):
        raise _bad(f"parameter {key} must be a string")
    return value


def _parameters(params: dict) -> tuple[str, str | None, bool]:
    # NOTE: clients add keys of their own here (tritonclient: binary_data_output, priority,
    # timeout, sequence_*); anything not read below is ignored, not refused.
    mode = _string(params, "mode", "eval")
    if mode not in MODES:
        raise _bad("parameter mode must be 'eval' or 'train'")
    request_id = _string(params, "request_id", None)
    binary_output = params.get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise _bad("parameter binary_data_output must be true or false")
    return mode, request_id, binary_output


def _outputs(value: Any, available: tuple[str, ...]) -> tuple[RequestedOutput, ...]:
    # NOTE: the protocol returns every output when none are named; here that is "output"
    # alone, and the batch statistics come only when asked for.
    if not value:
        return (RequestedOutput(OUTPUT, None),)
    if not isinstance(value, list):
        raise _bad("outputs must be a list")
    wanted: list[RequestedOutput] = []
    for item in value:
        item = _object(item, "each output")
        name = item.get("name")
        if name not in available:
            raise _bad(f"unknown output '{shown(name)}'; this model has {', '.join(available)}")
        if any(w.name == name for w in wanted):
            raise _bad(f"output '{shown(name)}' is requested twice")
        params = _object(item.get("parameters"), f"output '{shown(name)}' parameters")
        if "shared_memory_region" in params:
            raise _bad("shared memory is not supported; outputs travel in the body")
        if "classification" in params:
            raise _bad("classification outputs are not supported")
        binary = params.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise _bad(f"output '{shown(name)}': binary_data must be true or false")
        wanted.append(RequestedOutput(name, binary))
    return tuple(wanted)


def _input(value: Any) -> dict:
    if not isinstance(value, list) or len(value) != 1:
        raise _bad("inputs must list exactly one tensor")
    tensor = _object(value[0], "the input")
    if not isinstance(tensor.get("name"), str):
        raise _bad("the input needs a name")
    return tensor


def decode_infer_request(
    body: bytearray, header_value: str | None, available: tuple[str, ...],
    limits: Limits | None = None,
) -> InferRequest:
    """Parse the JSON header of ``body``; ``header_value`` is the request's
    ``Inference-Header-Content-Length``, ``available`` the model's output names."""
    length = header_length(header_value, len(body))
    payload = parse_json(body if length == len(body) else body[:length], limits)
    payload = _object(payload, "the request body")
    tensor = _input(payload.get("inputs"))
    name = tensor["name"]
    datatype = tensor.get("datatype")
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise _bad(f"input '{shown(name)}': datatype '{shown(datatype)}' is not supported; "
                   f"use {', '.join(DATATYPES)}")
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise _bad("input shape must be a list of non-negative integers")
    params = _object(tensor.get("parameters"), f"input '{shown(name)}' parameters")
    if "shared_memory_region" in params:
        raise _bad("shared memory is not supported; send the tensor in the body")
    size = params.get("binary_data_size")
    if size is not None and (type(size) is not int or size < 0):
        raise _bad(f"input '{shown(name)}': binary_data_size must be a non-negative integer")
    if (size is None) == ("data" not in tensor):
        raise _bad(f"input '{shown(name)}' needs exactly one of data or binary_data_size")
    request_id = payload.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise _bad("id must be a string")
    mode, idempotency_key, binary_output = _parameters(
        _object(payload.get("parameters"), "parameters"))
    outputs = _outputs(payload.get("outputs"), available)
    if mode == "train" and any(wanted.name == DRIFT for wanted in outputs):
        raise _bad(f"output '{DRIFT}' is given in eval mode only")
    return InferRequest(
        name, datatype, shape, tensor.get("data"), size, length, mode, idempotency_key,
        request_id, outputs, binary_output,
    )


def _aligned(body: bytearray, start: int, size: int, itemsize: int) -> memoryview:
    """``body[start:start + size]`` at an address that is a multiple of ``itemsize``.

    NOTE: binary data follows a JSON header of any length, so it is often misaligned, and
    compiled kernels may assume aligned elements. The blob slides down over the header,
    which is parsed already: a memmove in place, no new buffer.
    """
    view = memoryview(body)
    shift = (np.frombuffer(view, np.uint8).ctypes.data + start) % itemsize
    if shift == 0 or size == 0:
        return view[start:start + size]
    if start < shift:  # cannot happen after a real header; stay correct anyway
        return memoryview(bytearray(view[start:start + size]))
    view[start - shift:start - shift + size] = view[start:start + size]  # overlap-safe
    return view[start - shift:start - shift + size]


def _check_json_output(request: InferRequest, limits: Limits) -> None:
    """The main output asked for as JSON numbers, from a binary input: see
    check_json_output. (BF16 outputs always go binary.)"""
    if request.binary_size is None or request.datatype == "BF16":
        return
    for wanted in request.outputs:
        if wanted.name == OUTPUT and not request.binary(wanted):
            check_json_output(math.prod(request.shape), DTYPES[DATATYPES[request.datatype]][0],
                              limits, f"ask for output '{OUTPUT}' as binary data "
                              "(binary_data_output)")


def decode_input(request: InferRequest, body: bytearray, limits: Limits) -> torch.Tensor:
    """The input tensor: a view of ``body`` when binary (no copy), else built from JSON."""
    check_shape(request.shape, limits, "input")
    _check_json_output(request, limits)
    dtype = DATATYPES[request.datatype]
    trailing = len(body) - request.blob_offset
    if request.binary_size is None:
        if trailing:
            raise _bad(f"{trailing} bytes follow the JSON header but no input is binary")
        return decode_tensor({"shape": request.shape, "dtype": dtype, "data": request.data},
                             limits)[0]
    itemsize = DTYPES[dtype][1].itemsize
    needed = math.prod(request.shape) * itemsize
    if request.binary_size != needed:
        raise _bad(f"input '{shown(request.input_name)}': binary_data_size is "
                   f"{request.binary_size}; shape {request.shape} of {request.datatype} needs "
                   f"{needed} bytes")
    if trailing != needed:
        raise _bad(f"input '{shown(request.input_name)}': the body holds {trailing} bytes of "
                   f"binary data after the JSON header; binary_data_size says {needed}")
    return from_bytes(_aligned(body, request.blob_offset, needed, itemsize),
                      tuple(request.shape), dtype)


# --- responses --------------------------------------------------------------------------


def _datatype(tensor: torch.Tensor) -> str:
    return DATATYPE_OF[DTYPE_NAMES[tensor.dtype]]


def encode_infer_response(
    model: str, request: InferRequest, output: torch.Tensor, stats: dict[str, torch.Tensor],
    num_batches_tracked: int | None = None, version: int = 1, drift: Drift | None = None,
) -> tuple[bytes, list[memoryview]]:
    """(JSON header, binary blobs in ``outputs`` order). ``output`` keeps its datatype,
    ``stats`` (keyed mean/var/mean_square) and ``drift`` go out as FP32; blobs view the
    tensors."""
    tensors = {OUTPUT: output, **{stat_output(k): v.float() for k, v in stats.items()}}
    if any(wanted.name == DRIFT for wanted in request.outputs):
        score = math.nan if drift is None or drift.score is None else drift.score
        tensors[DRIFT] = torch.tensor([score], dtype=torch.float32)
    outputs: list[dict[str, Any]] = []
    blobs: list[memoryview] = []
    for wanted in request.outputs:
        tensor = tensors[wanted.name]
        entry: dict[str, Any] = {"name": wanted.name, "datatype": _datatype(tensor),
                                 "shape": list(tensor.shape)}
        # NOTE: BF16 always goes binary: JSON has no bfloat16 numbers, and clients before
        # r26.06 cannot read BF16 from JSON at all.
        if request.binary(wanted) or entry["datatype"] == "BF16":
            blob = to_bytes(tensor)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            # NOTE: JSON has no NaN or Infinity; orjson writes null, which clients read as NaN.
            entry["data"] = encode_tensor(tensor, "list")["data"]
        outputs.append(entry)
    parameters: dict[str, Any] = {"mode": request.mode}
    if num_batches_tracked is not None:
        parameters["num_batches_tracked"] = num_batches_tracked
    body: dict[str, Any] = {"model_name": model, "model_version": str(version)}
    if request.id is not None:
        body["id"] = request.id
    body["parameters"] = parameters
    body["outputs"] = outputs
    return dumps(body), blobs
