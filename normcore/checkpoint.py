"""Checkpoints are data, never code.

Reading: safetensors files, or torch files through ``torch.load(..., weights_only=True)``
(never plain pickle), so nothing inside a file runs. Every failure - missing, unsafe,
corrupt or truncated file, missing keys, wrong shapes or dtypes, NaN/Inf, a negative
``running_var`` - raises one ``CheckpointError`` naming the file and the reason, and leaves
the target layer untouched.

Writing: a layer's state, or several layers' under their module paths, as safetensors, so
adapted statistics can go back into a model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from torch import Tensor, nn

from .errors import CheckpointError

__all__ = [
    "FoundLayer",
    "find_norm_layers",
    "layer_state_bytes",
    "load_layer_state",
    "load_state_dict",
    "load_state_dict_bytes",
    "modules_state_bytes",
    "save_layer_state",
]

_SAFETENSORS_SUFFIXES = (".safetensors", ".st")


def _tensors_only(obj: object, source: str) -> dict[str, Tensor]:
    # Training checkpoints often nest the weights ({"state_dict": ...}) beside metadata.
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: expected a state dict, found {type(obj).__name__}")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}
    if not tensors:
        raise CheckpointError(f"{source}: holds no tensors")
    return tensors


def load_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a whole state dict (on the CPU) from a safetensors or torch file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix in _SAFETENSORS_SUFFIXES:
        try:
            return safetensors.torch.load_file(path, device="cpu")
        except Exception as exc:  # any parse failure means a corrupt or truncated file
            raise CheckpointError(f"{path}: not a valid safetensors file ({exc})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            reason = "refused: it holds objects other than tensors, which could run code"
        raise CheckpointError(f"{path}: cannot be read as a torch weights file ({reason})") \
            from None
    return _tensors_only(obj, str(path))


def load_state_dict_bytes(data: bytes, source: str = "upload") -> dict[str, Tensor]:
    """Read a state dict from safetensors bytes (uploads are accepted in no other format)."""
    try:
        return safetensors.torch.load(data)
    except Exception as exc:
        raise CheckpointError(f"{source}: not a valid safetensors file ({exc})") from None


@dataclass(frozen=True)
class FoundLayer:
    """A BatchNorm-family layer found in a whole-model state dict."""

    path: str  # module path, e.g. "layer1.0.bn1"
    prefix: str  # its key prefix, e.g. "layer1.0.bn1."
    num_features: int
    affine: bool


def find_norm_layers(state_dict: Mapping[str, Tensor]) -> list[FoundLayer]:
    """Every layer with running statistics (BatchNorm, tracked InstanceNorm), in key order.

    A layer is recognized by its ``running_mean`` and ``running_var`` buffers, the way
    torch names them; its size comes from ``running_mean``.
    """
    found = []
    for key, tensor in state_dict.items():
        if not key.endswith("running_mean"):
            continue
        prefix = key[: -len("running_mean")]
        if prefix + "running_var" not in state_dict or tensor.dim() != 1:
            continue
        found.append(
            FoundLayer(
                path=prefix.rstrip("."),
                prefix=prefix,
                num_features=tensor.numel(),
                affine=prefix + "weight" in state_dict and prefix + "bias" in state_dict,
            )
        )
    return found


def _checked(name: str, value: Tensor, expected: Tensor, source: str,
             require_finite: bool = True) -> Tensor:
    """``value`` in ``expected``'s dtype, if it is a sane value for that tensor.

    The checks run after the conversion: a finite float64 can overflow to Inf in
    float32, and an unsigned 64-bit count past int64's range wraps around to a negative.
    """
    if value.shape != expected.shape:
        raise CheckpointError(
            f"{source}: {name} has shape {list(value.shape)}, expected {list(expected.shape)}"
        )
    if expected.is_floating_point():
        if not value.is_floating_point():
            raise CheckpointError(f"{source}: {name} has dtype {value.dtype}, expected floats")
        converted = value.to(expected.dtype)
        if require_finite and not bool(torch.isfinite(converted).all()):
            raise CheckpointError(f"{source}: {name} holds NaN or Inf (as {expected.dtype})")
    elif value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise CheckpointError(f"{source}: {name} has dtype {value.dtype}, expected integers")
    else:
        converted = value.to(expected.dtype)
    if name.endswith("running_var") and bool((converted < 0).any()):
        raise CheckpointError(f"{source}: {name} has negative entries")
    if name.endswith("num_batches_tracked") and bool((converted < 0).any()):
        raise CheckpointError(f"{source}: {name} is negative")
    return converted


def load_layer_state(
    layer: nn.Module, state_dict: Mapping[str, Tensor], prefix: str = "",
    source: str = "state dict", *, require_finite: bool = True,
) -> None:
    """Check ``state_dict[prefix + name]`` for every tensor of ``layer``, then load them.

    Nothing is written unless every key is present with the right shape, dtype and
    finite, sane values. ``num_batches_tracked`` may be missing (it then starts at 0).
    ``require_finite=False`` lets NaN and Inf through: for state a layer held before (a
    layer that was let take non-finite train steps), not for a checkpoint to adopt.
    """
    own = layer.state_dict()
    picked = {}
    for name, expected in own.items():
        key = prefix + name
        if key not in state_dict:
            if name == "num_batches_tracked":
                continue
            raise CheckpointError(f"{source}: missing key {key!r}")
        picked[name] = _checked(key, state_dict[key], expected, source, require_finite)
    with torch.no_grad():
        layer.load_state_dict(picked, strict=False)


def _layer_tensors(layer: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in layer.state_dict().items()}


def layer_state_bytes(layer: nn.Module) -> bytes:
    """The layer's state dict as safetensors bytes, keys as torch.nn names them."""
    return safetensors.torch.save(_layer_tensors(layer), metadata={"kind": type(layer).__name__})


def modules_state_bytes(modules: Mapping[str, nn.Module]) -> bytes:
    """The state dicts of several layers as one safetensors file, each key prefixed by the
    layer's module path (``{"features.1": bn}`` -> ``features.1.running_mean``, ...): the
    part of a whole model's ``state_dict`` that these layers hold."""
    tensors = {f"{path}.{key}": value for path, layer in modules.items()
               for key, value in _layer_tensors(layer).items()}
    kinds = {path: type(layer).__name__ for path, layer in modules.items()}
    return safetensors.torch.save(tensors, metadata={"kinds": json.dumps(kinds)})


def save_layer_state(layer: nn.Module, path: str | Path) -> None:
    """Write the layer's state dict to a safetensors file."""
    safetensors.torch.save_file(
        _layer_tensors(layer), str(path), metadata={"kind": type(layer).__name__}
    )
