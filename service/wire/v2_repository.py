"""The V2 extensions Triton's clients reach for after infer: the model repository (an index
of the layers, load and unload), model configuration and statistics, as JSON for HTTP (the
gRPC transport builds its messages from the same dicts, field for field).

The configuration is Triton's ``ModelConfig`` in its JSON form: ``max_batch_size`` 0 (the
batch dim is in ``dims``, -1 where free) and the layer's constructor arguments as string
``parameters``. Statistics are Triton's ``ModelStatistics``: requests served
(``inference_count`` and ``execution_count`` count requests, not samples), the time spent
normalizing (``compute_infer``; ``success`` is the same span), refused train steps
(``fail``), nothing queued or cached.
"""

from __future__ import annotations

import json
from typing import Any

from ..core.engine import LayerInfo
from ..core.errors import InvalidRequestError
from .tensors import Limits, parse_json
from .v2_types import OUTPUT, PLATFORM, STATS_DATATYPE, stat_names, stat_output, tensor_shapes

READY = "READY"
UNAVAILABLE = "UNAVAILABLE"


def decode_request(body: bytes | bytearray, limits: Limits) -> dict[str, Any]:
    """A repository request's JSON object; an empty body is an empty object."""
    if not body.strip():
        return {}
    payload = parse_json(body, limits)
    if not isinstance(payload, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    return payload


def decode_index_request(payload: dict[str, Any]) -> bool:
    """Whether only the served layers are asked for (``{"ready": true}``)."""
    ready = payload.get("ready", False)
    if not isinstance(ready, bool):
        raise InvalidRequestError("ready must be true or false")
    return ready


def decode_load_request(payload: dict[str, Any]) -> None:
    """A load serves the layer as it is: a new configuration or files are refused."""
    parameters = payload.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidRequestError("parameters must be a JSON object")
    if any(key == "config" or str(key).startswith("file:") for key in parameters):
        raise InvalidRequestError("a load cannot change a layer's configuration or files; "
                                  "PUT /layers/{name} replaces a layer")


def repository_index(layers: list[LayerInfo], ready_only: bool = False) -> list[dict[str, Any]]:
    """``POST /v2/repository/index``: every layer with its version and state."""
    return [{"name": info.name, "version": str(info.version),
             "state": READY if info.loaded else UNAVAILABLE,
             "reason": "" if info.loaded else "unloaded"}
            for info in layers if info.loaded or not ready_only]


def _parameter(value: Any) -> dict[str, str]:
    return {"string_value": value if isinstance(value, str) else json.dumps(value)}


def model_config(info: LayerInfo) -> dict[str, Any]:
    """``GET /v2/models/{name}/config``."""
    shape, stats_shape = tensor_shapes(info.kind, info.config)
    outputs = [{"name": OUTPUT, "data_type": "TYPE_FP32", "dims": shape}]
    outputs += [{"name": stat_output(s), "data_type": f"TYPE_{STATS_DATATYPE}",
                 "dims": stats_shape} for s in stat_names(info.kind)]
    return {
        "name": info.name,
        "platform": PLATFORM,
        "backend": PLATFORM,
        "max_batch_size": 0,
        "input": [{"name": "input", "data_type": "TYPE_FP32", "dims": shape}],
        "output": outputs,
        "parameters": {"kind": _parameter(info.kind),
                       **{key: _parameter(value) for key, value in info.config.items()}},
    }


def _duration(count: int, ns: int) -> dict[str, int]:
    return {"count": count, "ns": ns}


def model_statistics(layers: list[LayerInfo]) -> dict[str, Any]:
    """``GET /v2/models[/{name}]/stats``."""
    stats = []
    for info in layers:
        served = sum(info.requests.values())
        last = 0 if info.last_inference is None else int(info.last_inference * 1000)
        zero = _duration(0, 0)
        stats.append({
            "name": info.name,
            "version": str(info.version),
            "last_inference": last,  # milliseconds since the epoch
            "inference_count": served,
            "execution_count": served,
            "inference_stats": {
                "success": _duration(served, info.compute_ns),
                "fail": _duration(info.rejected, 0),
                "queue": zero, "compute_input": zero,
                "compute_infer": _duration(served, info.compute_ns),
                "compute_output": zero, "cache_hit": zero, "cache_miss": zero,
            },
            "batch_stats": [],
        })
    return {"model_stats": stats}
