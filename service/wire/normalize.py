"""``POST /normalize`` bodies <-> values: the request's fields, and the reply.

    request  {"layer": str, "mode": "eval"|"train", "tensor": {...}, "output_encoding":
              "list"|"b64", "request_id": str}
    reply    {"layer", "mode", "output": {...}, "batch_stats": {name: {...}},
              "drift": {"score", "channels"} (eval), "num_batches_tracked" (train)}

Tensors are ``service.wire.tensors`` objects. The tensor is decoded apart from the other
fields, so a request can be refused (token, layer name) before its data is looked at.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..core.engine import Outcome
from ..core.errors import InvalidRequestError
from .drift import encode_drift
from .tensors import ENCODINGS, Limits, encode_tensor, parse_json


@dataclass(frozen=True)
class NormalizeRequest:
    layer: str
    mode: str  # eval or train
    output_encoding: str | None
    request_id: str | None
    tensor: Any  # the tensor object, not yet decoded


def _field(payload: dict, name: str, default: str | None,
           allowed: tuple[str, ...] | None = None) -> str | None:
    value = payload.get(name, default)
    if value is None:
        return None
    if not isinstance(value, str) or (allowed and value not in allowed):
        expected = " or ".join(repr(a) for a in allowed) if allowed else "a string"
        raise InvalidRequestError(f"{name} must be {expected}")
    return value


def decode_normalize_request(body: bytes | bytearray, limits: Limits) -> NormalizeRequest:
    payload = parse_json(body, limits)
    if not isinstance(payload, dict):
        raise InvalidRequestError("body must be a JSON object")
    layer = _field(payload, "layer", None)
    if layer is None:
        raise InvalidRequestError("layer is required")
    return NormalizeRequest(
        layer,
        _field(payload, "mode", "eval", ("eval", "train")),
        _field(payload, "output_encoding", None, ENCODINGS),
        _field(payload, "request_id", None),
        payload.get("tensor"),
    )


def encode_normalize_response(layer: str, mode: str, outcome: Outcome,
                              encoding: str) -> dict[str, Any]:
    body = {
        "layer": layer,
        "mode": mode,
        "output": encode_tensor(outcome.output, encoding),
        "batch_stats": {k: encode_tensor(v, encoding) for k, v in outcome.stats.items()},
    }
    if mode == "train":
        body["num_batches_tracked"] = outcome.num_batches_tracked
    else:
        body["drift"] = encode_drift(outcome.drift)
    return body
