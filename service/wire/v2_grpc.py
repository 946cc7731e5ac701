"""KServe V2 over gRPC: ``inference.ModelInferRequest`` <-> tensors, and the metadata
replies, with the messages of ``service.wire.proto``.

An infer request carries one input, as raw little-endian bytes (``raw_input_contents``,
what tritonclient sends) or as typed contents (``fp32_contents`` for FP32,
``fp64_contents`` for FP64; FP16 and BF16 have no typed field in the protocol). Outputs go
back the way the input came: raw bytes, or typed contents where the datatype has a field.
The request parameters are those of V2 over HTTP (``service.wire.v2``): ``mode`` and
``request_id``; mistakes raise ``InvalidRequestError`` with the same words.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from google.protobuf import json_format

from ..core.engine import MODES
from ..core.errors import InvalidRequestError, shown
from .proto import messages
from .tensors import DTYPE_NAMES, DTYPES, Limits, check_shape, from_bytes, to_bytes
from .v2_types import DATATYPE_OF, DATATYPES, OUTPUT, stat_output

# Datatypes with a typed contents field, and its name.
TYPED = {"FP32": "fp32_contents", "FP64": "fp64_contents"}
_REFUSED_PARAMETERS = {
    "shared_memory_region": "shared memory is not supported; send the tensor in the request",
    "classification": "classification outputs are not supported",
}


def _bad(message: str) -> InvalidRequestError:
    return InvalidRequestError(message)


@dataclass(frozen=True)
class GrpcInferRequest:
    """An infer request, checked; ``x`` is its input tensor."""

    x: torch.Tensor
    mode: str
    request_id: str | None
    id: str
    outputs: tuple[str, ...]
    typed: bool  # the input came as typed contents


def _string_parameter(params: Any, key: str, default: str | None) -> str | None:
    if key not in params:
        return default
    value = params[key]
    if value.WhichOneof("parameter_choice") != "string_param":
        raise _bad(f"parameter {key} must be a string")
    return value.string_param


def _refuse(params: Any, what: str) -> None:
    for key, message in _REFUSED_PARAMETERS.items():
        if key in params or any(k.startswith(key + "_") for k in params):
            raise _bad(f"{what}: {message}")


def _outputs(request: Any, available: tuple[str, ...]) -> tuple[str, ...]:
    # NOTE: as over HTTP, no outputs named means "output" alone.
    if not request.outputs:
        return (OUTPUT,)
    wanted: list[str] = []
    for item in request.outputs:
        if item.name not in available:
            raise _bad(f"unknown output '{shown(item.name)}'; this model has "
                       f"{', '.join(available)}")
        if item.name in wanted:
            raise _bad(f"output '{shown(item.name)}' is requested twice")
        _refuse(item.parameters, f"output '{shown(item.name)}'")
        wanted.append(item.name)
    return tuple(wanted)


def _typed_input(tensor: Any, shape: tuple[int, ...]) -> torch.Tensor:
    name = shown(tensor.name)
    field = TYPED.get(tensor.datatype)
    present = [f.name for f, _ in tensor.contents.ListFields()]
    if field is None:
        raise _bad(f"input '{name}': {tensor.datatype} has no typed contents field in the "
                   "protocol; send it as raw_input_contents")
    if present != [field]:
        raise _bad(f"input '{name}': {tensor.datatype} data goes in contents.{field}")
    values = getattr(tensor.contents, field)
    if len(values) != math.prod(shape):
        raise _bad(f"input '{name}': contents.{field} holds {len(values)} values; shape "
                   f"{list(shape)} needs {math.prod(shape)}")
    dtype = DTYPES[DATATYPES[tensor.datatype]][1]
    return torch.from_numpy(np.asarray(values, dtype=dtype).reshape(shape))


def _raw_input(tensor: Any, raw: bytes, shape: tuple[int, ...]) -> torch.Tensor:
    dtype = DATATYPES[tensor.datatype]
    needed = math.prod(shape) * DTYPES[dtype][1].itemsize
    if len(raw) != needed:
        raise _bad(f"input '{shown(tensor.name)}': raw_input_contents holds {len(raw)} bytes; "
                   f"shape {list(shape)} of {tensor.datatype} needs {needed}")
    # A copy: protobuf's bytes are read-only, and a tensor must own writable memory.
    return from_bytes(bytearray(raw), shape, dtype)


def decode_infer_request(request: Any, available: tuple[str, ...], limits: Limits
                         ) -> GrpcInferRequest:
    """Check a ``ModelInferRequest`` for a model whose outputs are ``available``."""
    if len(request.inputs) != 1:
        raise _bad("inputs must list exactly one tensor")
    tensor = request.inputs[0]
    name = shown(tensor.name)
    if tensor.datatype not in DATATYPES:
        raise _bad(f"input '{name}': datatype '{shown(tensor.datatype)}' is not supported; "
                   f"use {', '.join(DATATYPES)}")
    shape = check_shape(list(tensor.shape), limits, "input")
    _refuse(tensor.parameters, f"input '{name}'")
    mode = _string_parameter(request.parameters, "mode", "eval")
    if mode not in MODES:
        raise _bad("parameter mode must be 'eval' or 'train'")
    request_id = _string_parameter(request.parameters, "request_id", None)
    outputs = _outputs(request, available)
    typed = tensor.HasField("contents")
    if len(request.raw_input_contents) > 1:
        raise _bad("raw_input_contents must hold one tensor: there is one input")
    if typed == bool(request.raw_input_contents):
        raise _bad(f"input '{name}' needs exactly one of contents or raw_input_contents")
    x = (_typed_input(tensor, shape) if typed
         else _raw_input(tensor, request.raw_input_contents[0], shape))
    return GrpcInferRequest(x, mode, request_id, request.id, outputs, typed)


def encode_infer_response(
    model: str, version: str, request: GrpcInferRequest, output: torch.Tensor,
    stats: dict[str, torch.Tensor], num_batches_tracked: int | None = None,
) -> Any:
    """A ``ModelInferResponse``: ``output`` in its datatype, ``stats`` as FP32."""
    tensors = {OUTPUT: output, **{stat_output(k): v.float() for k, v in stats.items()}}
    reply = messages.ModelInferResponse(model_name=model, model_version=version, id=request.id)
    reply.parameters["mode"].string_param = request.mode
    if num_batches_tracked is not None:
        reply.parameters["num_batches_tracked"].int64_param = num_batches_tracked
    for name in request.outputs:
        tensor = tensors[name]
        datatype = DATATYPE_OF[DTYPE_NAMES[tensor.dtype]]
        entry = reply.outputs.add(name=name, datatype=datatype, shape=list(tensor.shape))
        # NOTE: the protocol wants raw contents for every output or for none. A typed input
        # is FP32 or FP64, so every output (statistics are FP32) has a typed field.
        if request.typed:
            getattr(entry.contents, TYPED[datatype]).extend(tensor.cpu().reshape(-1).numpy())
        else:
            reply.raw_output_contents.append(to_bytes(tensor).tobytes())
    return reply


def to_message(value: dict[str, Any], message_class: type) -> Any:
    """A metadata, configuration or statistics reply from the dict HTTP sends (the same
    field names; what the messages leave out, such as ``batch_stats``, is dropped)."""
    return json_format.ParseDict(value, message_class(), ignore_unknown_fields=True)
