"""torch.nn twins of served layers, built from the state the service reports."""

from __future__ import annotations

import base64

import numpy as np
import safetensors.torch
import torch


def twin(kind: str, config: dict, state_bytes: bytes) -> torch.nn.Module:
    """The torch.nn module with the served layer's configuration and state."""
    args = dict(config)
    if args.get("momentum") == "cumulative":
        args["momentum"] = None
    if kind == "LayerNorm" and "bias" in args:
        args["bias"] = bool(args["bias"])
    module = getattr(torch.nn, kind)(**args)
    module.load_state_dict(safetensors.torch.load(state_bytes))
    return module


def twin_of(http, name: str) -> torch.nn.Module:
    """``http`` is an httpx-style client (TestClient or httpx.Client) with the token set."""
    entry = http.get(f"/stats/{name}").json()
    state = http.get(f"/layers/{name}/state").content
    return twin(entry["kind"], entry["config"], state)


def tensor(array: np.ndarray, encoding: str = "list") -> dict:
    array = np.ascontiguousarray(array, dtype=np.float32)
    obj = {"shape": list(array.shape), "dtype": "float32"}
    if encoding == "b64":
        obj["b64"] = base64.b64encode(array.tobytes()).decode()
    else:
        obj["data"] = array.tolist()
    return obj


def array(obj: dict) -> np.ndarray:
    dtype = {"float32": "<f4", "float16": "<f2", "float64": "<f8"}[obj["dtype"]]
    if "b64" in obj:
        return np.frombuffer(base64.b64decode(obj["b64"]), dtype=dtype).reshape(obj["shape"])
    return np.asarray(obj["data"], dtype=dtype).reshape(obj["shape"])
