"""What every functional family shares: the result types, the input checks torch runs
before it normalizes, biased statistics and the running-statistics update."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .errors import InputError, NonFiniteError

__all__ = [
    "Normalized",
    "REDUCED",
    "RMSNormalized",
    "check_finite",
    "check_per_channel",
    "check_writable",
    "fold_running",
    "raise_non_finite",
    "stat_dtype",
    "update_running",
    "var_from_rstd",
    "var_mean",
    "verify_batch_size",
    "verify_spatial_size",
]

# Accumulated in float32, as torch does.
REDUCED = (torch.float16, torch.bfloat16)


class Normalized(NamedTuple):
    """A normalized tensor and the statistics of its input (biased variance)."""

    output: Tensor
    mean: Tensor
    var: Tensor


class RMSNormalized(NamedTuple):
    """An RMS-normalized tensor and the mean square of its input."""

    output: Tensor
    mean_square: Tensor


# --- checks shared with torch (same messages; InputError is also a ValueError, as here) ---


def verify_batch_size(size: Sequence[int]) -> None:
    # torch's count, dim 0 times the spatial dims: it never divides by a channel count of 0.
    if size[0] * math.prod(size[2:]) == 1:
        raise InputError(
            f"Expected more than 1 value per channel when training, got input size {size}"
        )


def verify_eps(eps: float, training: bool) -> None:
    # torch.nn.functional.batch_norm's check: batch statistics need eps > 0.
    if training and eps <= 0.0:
        raise InputError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise InputError(f"batch_norm eps must be non-negative, but got {eps}")


def verify_spatial_size(size: Sequence[int]) -> None:
    if math.prod(size[2:]) == 1:
        raise InputError(
            f"Expected more than 1 spatial element when training, got input size {size}"
        )


_PER_CHANNEL = ("running_mean", "running_var", "weight", "bias")


def check_per_channel(channels: int, running_mean: Tensor | None, running_var: Tensor | None,
                      weight: Tensor | None, bias: Tensor | None) -> None:
    # Checked up front: an in-place update with a mis-sized buffer would fail half-way.
    for name, tensor in zip(_PER_CHANNEL, (running_mean, running_var, weight, bias), strict=True):
        if tensor is not None and tensor.numel() != channels:
            raise RuntimeError(f"{name} should contain {channels} elements not {tensor.numel()}")


def check_writable(*buffers: Tensor | None) -> None:
    """Refuse, before anything is written, a train step whose buffers are inference tensors
    outside inference mode: torch refuses it too, but only after its kernel has written."""
    if torch.is_inference_mode_enabled():
        return
    for buffer in buffers:
        if buffer is not None and buffer.is_inference():
            raise RuntimeError(
                "Inplace update to inference tensor outside InferenceMode is not allowed"
                " (the layer's running statistics were made in inference mode)"
            )


def check_finite(*stats: Tensor) -> None:
    # NaN/Inf in the input always reaches the mean or variance, so checking the few
    # per-channel statistics costs nothing next to scanning the whole input. A NaN or Inf
    # anywhere makes a sum NaN or Inf: one reduction per tensor settles the usual case, and
    # only a sum that is not finite (which finite values may give by overflowing) takes the
    # exact test, a few more operations than torch.isfinite.
    if all(math.isfinite(float(s.sum())) for s in stats):
        return
    if not all(bool(torch.isfinite(s).all()) for s in stats):
        raise_non_finite()


def raise_non_finite() -> None:
    raise NonFiniteError(
        "input has non-finite values (NaN or Inf) or statistics that overflow; "
        "refusing to fold them into the running statistics"
    )


# --- statistics ---------------------------------------------------------------------------


def var_mean(input: Tensor, dims: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Biased (var, mean) over ``dims``; float32 for reduced-precision inputs.

    torch.var_mean is numerically stable (Welford), so inputs far from zero keep their
    accuracy; there is no E[x^2] - E[x]^2 cancellation.
    """
    x = input.float() if input.dtype in REDUCED else input
    if x.numel() == 0:  # nothing to reduce: NaN statistics, as torch's kernels give
        shape = [n for d, n in enumerate(x.shape) if d not in set(dims)]
        nan = torch.full(shape, math.nan, dtype=x.dtype, device=x.device)
        return nan, nan.clone()
    return torch.var_mean(x, dim=list(dims), correction=0)


def var_from_rstd(rstd: Tensor, eps: float) -> Tensor:
    # The fused kernels return 1/sqrt(var + eps); undoing it is exact to a few ulps of
    # (var + eps) and spares a second pass over the input.
    return (rstd.pow(-2) - eps).clamp_(min=0)


def stat_dtype(input: Tensor, like: Tensor | None) -> torch.dtype:
    """The dtype torch normalizes ``input`` in: the weight's if any, else float32 for
    reduced-precision inputs and the input's own otherwise."""
    if like is not None:
        return like.dtype
    return torch.float32 if input.dtype in REDUCED else input.dtype


def fold_running(running_mean: Tensor, running_var: Tensor, stats: Tensor,
                 momentum: float) -> None:
    """``update_running`` from ``stats``, a [2, C] tensor of the batch's mean and unbiased
    variance, both buffers at once: ``running = (1 - momentum) * running + momentum * batch``,
    torch.nn's formula (a lerp would differ on an infinite running value: Inf - Inf)."""
    mean, unbiased = stats.unbind()
    running = [running_mean, running_var]
    torch._foreach_mul_(running, 1 - momentum)
    torch._foreach_add_(
        running, [mean.to(running_mean.dtype), unbiased.to(running_var.dtype)], alpha=momentum
    )


def update_running(
    running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, count: int,
    momentum: float,
) -> None:
    """Fold biased batch statistics over ``count`` values into the running ones, in place."""
    unbiased = var * (count / (count - 1))
    running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
    running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
