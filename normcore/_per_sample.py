"""LayerNorm, RMSNorm and GroupNorm: statistics of each sample, no running statistics."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ._stats import REDUCED, Normalized, RMSNormalized, var_from_rstd, var_mean, verify_batch_size
from .kernels import cpu as _fast

__all__ = [
    "group_norm",
    "group_norm_with_stats",
    "layer_norm",
    "layer_norm_with_stats",
    "rms_norm",
    "rms_norm_with_stats",
]


def _as_shape(normalized_shape: int | Sequence[int]) -> tuple[int, ...]:
    if type(normalized_shape) is tuple:  # the modules' own, on every call
        return normalized_shape
    if isinstance(normalized_shape, int):
        return (normalized_shape,)
    return tuple(normalized_shape)


# --- layer norm ---------------------------------------------------------------------------


def layer_norm_with_stats(
    input: Tensor, normalized_shape: Sequence[int], weight: Tensor | None = None,
    bias: Tensor | None = None, eps: float = 1e-5,
) -> Normalized:
    """``layer_norm`` that also returns the statistics, of shape ``input.shape[:-k]``."""
    shape = _as_shape(normalized_shape)
    fast = _fast.layer_norm(input, shape, weight, bias, eps, stats=True)
    if fast is not None:
        return Normalized(*fast)
    lead = input.shape[: input.dim() - len(shape)]
    # torch's fused kernel gives a mean of 0 for rows of no values; var_mean gives NaN.
    if input.dtype in REDUCED or input.numel() == 0:
        output = torch.layer_norm(input, shape, weight, bias, eps)
        var, mean = var_mean(input, range(len(lead), input.dim()))
        return Normalized(output, mean.reshape(lead), var.reshape(lead))
    output, mean, rstd = torch.native_layer_norm(input, shape, weight, bias, eps)
    return Normalized(output, mean.reshape(lead), var_from_rstd(rstd, eps).reshape(lead))


def layer_norm(
    input: Tensor, normalized_shape: Sequence[int], weight: Tensor | None = None,
    bias: Tensor | None = None, eps: float = 1e-5,
) -> Tensor:
    """y = (x - mean) / sqrt(var + eps) * weight + bias over the last ``len(shape)`` dims."""
    shape = _as_shape(normalized_shape)
    fast = _fast.layer_norm(input, shape, weight, bias, eps, stats=False)
    if fast is not None:
        return fast[0]
    return torch.layer_norm(input, shape, weight, bias, eps)


# --- group norm ---------------------------------------------------------------------------


def _check_group_norm(input: Tensor, num_groups: int) -> None:
    if input.dim() < 2:
        raise RuntimeError(
            f"Expected at least 2 dimensions for input tensor but received {input.dim()}"
        )
    verify_batch_size(
        [input.size(0) * input.size(1) // num_groups, num_groups, *input.shape[2:]]
    )


def group_norm_with_stats(
    input: Tensor, num_groups: int, weight: Tensor | None = None,
    bias: Tensor | None = None, eps: float = 1e-5,
) -> Normalized:
    """``group_norm`` that also returns the per-group statistics, shape ``[N, G]``."""
    # The kernels decline every input that _check_group_norm would refuse.
    fast = _fast.group_norm(input, num_groups, weight, bias, eps)
    if fast is not None:
        return Normalized(*fast)
    _check_group_norm(input, num_groups)
    batch, channels = input.size(0), input.size(1)
    if input.dtype in REDUCED or channels % num_groups or input.numel() == 0:
        output = torch.group_norm(input, num_groups, weight, bias, eps)
        per_group = channels // num_groups * math.prod(input.shape[2:])
        grouped = input.reshape(batch, num_groups, per_group)
        var, mean = var_mean(grouped, [2])
        return Normalized(output, mean, var)
    hxw = input.numel() // max(batch * channels, 1)
    output, mean, rstd = torch.native_group_norm(
        input.contiguous(), weight, bias, batch, channels, hxw, num_groups, eps
    )
    return Normalized(output, mean, var_from_rstd(rstd, eps))


def group_norm(
    input: Tensor, num_groups: int, weight: Tensor | None = None,
    bias: Tensor | None = None, eps: float = 1e-5,
) -> Tensor:
    """Normalize each sample over groups of ``C / num_groups`` channels and all spatial dims."""
    # The kernels decline every input that _check_group_norm would refuse.
    fast = _fast.group_norm(input, num_groups, weight, bias, eps, stats=False)
    if fast is not None:
        return fast[0]
    _check_group_norm(input, num_groups)
    return torch.group_norm(input, num_groups, weight, bias, eps, torch.backends.cudnn.enabled)


# --- RMS norm -----------------------------------------------------------------------------


def _rms_eps(input: Tensor, eps: float | None) -> float:
    if eps is not None:
        return eps
    # torch's default is the epsilon of the dtype it computes in (float32 for half types).
    return torch.finfo(torch.float32 if input.dtype in REDUCED else input.dtype).eps


def rms_norm_with_stats(
    input: Tensor, normalized_shape: Sequence[int], weight: Tensor | None = None,
    eps: float | None = None,
) -> RMSNormalized:
    """``rms_norm`` that also returns the mean square, of shape ``input.shape[:-k]``."""
    shape = _as_shape(normalized_shape)
    fast = _fast.rms_norm(input, shape, weight, eps, stats=True)
    if fast is not None:
        return RMSNormalized(*fast)
    eps_value = _rms_eps(input, eps)
    lead = input.shape[: input.dim() - len(shape)]
    fused = getattr(torch.ops.aten, "_fused_rms_norm", None)
    if fused is not None and input.numel() > 0:  # else the mean square of nothing: NaN
        output, rstd = fused(input, list(shape), weight, eps_value)
        return RMSNormalized(output, var_from_rstd(rstd, eps_value).reshape(lead))
    # Plain torch, for releases without the fused kernel.
    dims = list(range(len(lead), input.dim()))
    x = input.float() if input.dtype in REDUCED else input
    mean_square = x.pow(2).mean(dims, keepdim=True)
    output = torch.rms_norm(input, shape, weight, eps)
    return RMSNormalized(output, mean_square.reshape(lead))


def rms_norm(
    input: Tensor, normalized_shape: Sequence[int], weight: Tensor | None = None,
    eps: float | None = None,
) -> Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight over the last ``len(shape)`` dims."""
    shape = _as_shape(normalized_shape)
    fast = _fast.rms_norm(input, shape, weight, eps, stats=False)
    if fast is not None:
        return fast[0]
    return torch.rms_norm(input, list(shape), weight, eps)
