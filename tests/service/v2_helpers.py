"""Shared by the V2 tests: tritonclient calls, numpy <-> torch, and torch.nn references
built from what a server says about a layer (``/stats/{name}``, ``/layers/{name}/state``)."""

from __future__ import annotations

from collections.abc import Sequence

import httpx
import ml_dtypes
import numpy as np
import torch
import tritonclient.http as triton
from safetensors.torch import load as load_safetensors
from torch import nn

NUMPY_DTYPES = {"FP32": np.float32, "FP16": np.float16, "BF16": ml_dtypes.bfloat16,
                "FP64": np.float64}
TORCH_DTYPES = {"FP32": torch.float32, "FP16": torch.float16, "BF16": torch.bfloat16,
                "FP64": torch.float64}


def triton_client(url: str) -> triton.InferenceServerClient:
    # NOTE: tritonclient takes host:port without the scheme.
    return triton.InferenceServerClient(url.removeprefix("http://"), network_timeout=120)


def to_numpy(x: torch.Tensor, datatype: str) -> np.ndarray:
    if datatype == "BF16":  # numpy has no bfloat16 of its own: reinterpret the bits
        return x.to(torch.bfloat16).view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return x.to(TORCH_DTYPES[datatype]).numpy()


def to_torch(a: np.ndarray) -> torch.Tensor:
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


def infer(
    client: triton.InferenceServerClient, model: str, x: np.ndarray, datatype: str,
    *, binary: bool = True, outputs: Sequence[str] | None = None,
    binary_outputs: bool | None = None, **kwargs,
) -> triton.InferResult:
    """One infer call with ``x`` as the input; ``outputs`` named ones (binary like the
    input unless ``binary_outputs`` says), else the server's default."""
    tensor = triton.InferInput("x", list(x.shape), datatype)
    tensor.set_data_from_numpy(x, binary_data=binary)
    wanted = None
    if outputs is not None:
        flag = binary if binary_outputs is None else binary_outputs
        wanted = [triton.InferRequestedOutput(name, binary_data=flag) for name in outputs]
    return client.infer(model, [tensor], outputs=wanted, **kwargs)


def reference_layer(http: httpx.Client, name: str) -> tuple[str, nn.Module]:
    """(kind, a torch.nn layer with the served layer's configuration and current state)."""
    entry = http.get(f"/stats/{name}").raise_for_status().json()
    config = dict(entry["config"])
    if config.get("momentum") == "cumulative":
        config["momentum"] = None
    layer = getattr(nn, entry["kind"])(**config)
    state = load_safetensors(http.get(f"/layers/{name}/state").raise_for_status().content)
    layer.load_state_dict(state)
    return entry["kind"], layer.eval()


def batch_stats(kind: str, layer: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The statistics of ``x`` that ``layer`` normalizes over, in float64, keyed by V2
    output name (biased variance)."""
    x = x.double()
    if kind.startswith("BatchNorm"):
        dims = [d for d in range(x.dim()) if d != 1]
    elif kind.startswith("InstanceNorm"):
        dims = list(range(2, x.dim()))
    elif kind == "GroupNorm":
        x, dims = x.reshape(x.shape[0], layer.num_groups, -1), [2]
    else:  # LayerNorm, RMSNorm: the trailing normalized_shape
        dims = list(range(x.dim() - len(layer.normalized_shape), x.dim()))
    if kind == "RMSNorm":
        return {"batch_mean_square": x.pow(2).mean(dims)}
    var, mean = torch.var_mean(x, dims, correction=0)
    return {"batch_mean": mean, "batch_var": var}
