"""The drift score: how far one batch's per-channel statistics are from a reference.

For channel c, with the batch's mean and unbiased variance (m1, v1) and the reference's
(m2, v2), each variance plus the layer's eps (what normalization divides by, so a channel
of constant values stays finite), the score of the channel is the symmetric
Kullback-Leibler divergence (Jeffreys divergence) of the two Gaussians:

    J_c = KL(N(m1, v1) || N(m2, v2)) + KL(N(m2, v2) || N(m1, v1))
        = ((v1 - v2)^2 + (m1 - m2)^2 (v1 + v2)) / (2 v1 v2)

and the score of the batch is the mean of J_c over channels. Its scale: 0 for equal
statistics; 1 for a mean moved by one standard deviation (v1 = v2), d^2 for d standard
deviations; 1.125 for a variance 4 times (or a quarter of) the reference, about r / 2 for
a ratio r. A shift and a change of scale score alike, in either direction.

Batch size: a batch drawn from the reference itself scores about 2 / m on average, m the
values behind each channel's statistics (N for an [N, C] input, N*H*W for BatchNorm2d):
the sampling error of its mean adds about 1 / m, that of its variance about 1 / m (more for
m under 30, where the sample variance is skewed: 0.36 at m = 8). Averaged over C channels
it scatters by about 2 / (m sqrt(C)). A threshold well above 2 / m (0.5, say) flags real
change and not noise.

What is compared, by kind:

- BatchNorm: the batch statistics per channel, which it computes anyway.
- InstanceNorm: its per-instance statistics averaged over the batch, as its running
  statistics average them (m = N * spatial size).
- GroupNorm: per group, likewise from its per-(sample, group) statistics.
- LayerNorm, RMSNorm: per normalized feature, over the rows of the batch (at most
  ``MAX_ROWS``, evenly spaced): one more read of the input, fused with the score.

The reference is the layer's running statistics where it keeps them (BatchNorm, and
InstanceNorm with ``track_running_stats``). Every other layer keeps an exponential average
of the statistics of the eval inputs it has served: the first batch starts it, and each
later one, once scored, moves it by ``fold_weight``. So a lasting shift scores high at
first and fades over some 1 / ``INPUT_MOMENTUM`` batches as the reference follows it.

For float32 or float64 CPU statistics one fused call computes the score
(``normcore.kernels``), else a few vectorised torch operations on tensors of C values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from normcore.functional import batch_norm_stats
from normcore.kernels import drift as _fast

__all__ = [
    "BUCKETS",
    "DEFAULT_EPS",
    "INPUT_MOMENTUM",
    "MAX_ROWS",
    "NO_DRIFT",
    "TOP_CHANNELS",
    "Drift",
    "DriftInfo",
    "Moments",
    "Reference",
    "drift",
    "feature_drift",
    "feature_moments",
    "feature_rows",
    "fold_weight",
    "start",
    "symmetric_kl",
]

# Variance floor for layers without an eps (RMSNorm's None).
DEFAULT_EPS = 1e-5
# How fast the input reference follows the inputs, once 1/INPUT_MOMENTUM batches are in:
# until then every batch weighs the same (a cumulative average), so the first is no anchor.
INPUT_MOMENTUM = 0.05
# LayerNorm's and RMSNorm's per-feature input statistics are taken over at most this many
# evenly spaced rows: the sampling noise is then about 2 / MAX_ROWS, and a big input costs
# a read of a slice of it, not a second pass.
MAX_ROWS = 1024
TOP_CHANNELS = 3
# Upper bounds of the score histogram (/metrics): about 2/m for a batch like the reference
# (m values per channel), 1 for a mean moved by one standard deviation.
BUCKETS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 100.0)


class Moments(NamedTuple):
    """Statistics of one batch: per channel ([C]), or per instance and channel ([N, C],
    whose averages over instances count, as InstanceNorm's running statistics average
    them); the mean, and the variance, biased over ``count`` values each."""

    mean: Tensor
    var: Tensor
    count: int

    @property
    def unbias(self) -> float:
        """The factor that makes ``var`` unbiased (Bessel's correction)."""
        return self.count / (self.count - 1)


class Drift(NamedTuple):
    """The score of one batch (None when there is none: no reference yet, one value per
    channel, or non-finite statistics) and its ``TOP_CHANNELS`` channels that moved most,
    as (index, J_c)."""

    score: float | None
    channels: tuple[tuple[int, float], ...] = ()


NO_DRIFT = Drift(None)


@dataclass(frozen=True)
class DriftInfo:
    """A layer's drift as ``/stats`` shows it."""

    reference: str  # "running" (the running statistics) or "inputs" (an average of inputs)
    latest: float | None
    ema: float | None
    max: float | None
    scored: int  # batches with a score
    threshold: float | None
    crossings: int
    history: tuple[tuple[float, float], ...]  # (seconds since the epoch, score), oldest first
    channels: tuple[tuple[int, float], ...]  # of the latest score
    buckets: tuple[int, ...]  # scores per BUCKETS interval, and over the last bound
    total: float  # the sum of the scores
    reference_mean: Tensor | None = None  # the input reference, for "inputs"
    reference_var: Tensor | None = None
    reference_batches: int = 0


def symmetric_kl(mean1: Tensor, var1: Tensor, mean2: Tensor, var2: Tensor) -> Tensor:
    """J per channel (see the module): ``((v1 - v2)^2 + (m1 - m2)^2 (v1 + v2)) / (2 v1 v2)``
    for Gaussians N(mean1, var1) and N(mean2, var2), variances positive; shape [C]."""
    spread = var1 - var2
    shift = mean1 - mean2
    numerator = torch.addcmul(spread * spread, shift * shift, var1 + var2)
    return numerator.div_(var1 * var2).mul_(0.5)


class Reference:
    """What batches are scored against: a mean and an unbiased variance, [C] each. The fused
    kernels read float32 or float64 CPU ones (and fold batches into them) by address,
    checked once here; others take the torch path."""

    __slots__ = ("fast", "mean", "var")

    def __init__(self, mean: Tensor, var: Tensor) -> None:
        self.mean = mean
        self.var = var
        self.fast = _fast.drift_reference(mean, var)


def _scored(fast: tuple[float, tuple[tuple[int, float], ...]]) -> Drift:
    value, channels = fast
    return Drift(value, channels) if math.isfinite(value) else NO_DRIFT


def drift(batch: Moments, reference: Reference, eps: float, weight: float = 0.0) -> Drift:
    """The drift of ``batch`` from ``reference``. With ``weight`` > 0 and a finite score,
    the reference then moves that far towards the batch, in place:
    ``ref += weight * (batch - ref)``."""
    count = batch.count
    if count < 2:
        return NO_DRIFT  # one value per statistic has no variance
    if reference.fast is not None:
        fast = _fast.gaussian_drift(batch.mean, batch.var, count / (count - 1),
                                    reference.fast, eps, weight, TOP_CHANNELS)
        if fast is not None:
            return _scored(fast)
    mean, var = _averaged(batch)
    ref_mean, ref_var = reference.mean, reference.var
    per_channel = symmetric_kl(mean, var + eps, ref_mean, ref_var + eps)
    value = per_channel.mean().item()
    if not math.isfinite(value):
        return NO_DRIFT
    if weight > 0:
        ref_mean.lerp_(mean.to(ref_mean.dtype), weight)
        ref_var.lerp_(var.to(ref_var.dtype), weight)
    values, indices = per_channel.topk(min(TOP_CHANNELS, per_channel.numel()))
    return Drift(value, tuple(zip(indices.tolist(), values.tolist(), strict=True)))


def _averaged(batch: Moments) -> tuple[Tensor, Tensor]:
    """(mean, unbiased var), shape [C]: per-instance statistics averaged over instances."""
    mean, var = batch.mean, batch.var
    if mean.dim() == 2:
        mean, var = mean.mean(0), var.mean(0)
    return mean, var * batch.unbias


def start(batch: Moments) -> Reference | None:
    """A new input reference from its first batch, its tensors owned by the reference; None
    if the batch has no usable statistics."""
    if batch.count < 2 or batch.mean.numel() == 0:
        return None
    mean, var = _averaged(batch)
    if not bool(torch.isfinite(mean.sum() + var.sum())):
        return None
    return Reference(mean.clone(), var.clone())


def fold_weight(batches: int) -> float:
    """How far the input reference moves towards its ``batches``-th batch (from 2): 1/n
    while that is over ``INPUT_MOMENTUM``, a cumulative average until then."""
    return max(1.0 / batches, INPUT_MOMENTUM)


def feature_rows(x: Tensor, features: int) -> Tensor:
    """An input as [R, features] rows (LayerNorm, RMSNorm), at most ``MAX_ROWS`` of them,
    evenly spaced (then a contiguous copy)."""
    rows = x.numel() // max(features, 1)
    flat = x if x.dim() == 2 else x.reshape(rows, features)
    if rows > MAX_ROWS:
        flat = flat[:: -(-rows // MAX_ROWS)].contiguous()
    return flat


def feature_moments(rows: Tensor) -> Moments:
    """Per-feature statistics of [R, features] rows."""
    mean, var = batch_norm_stats(rows)
    return Moments(mean, var, rows.size(0))


def feature_drift(rows: Tensor, reference: Reference, eps: float,
                  weight: float) -> Drift | None:
    """``drift(feature_moments(rows), ...)`` in one fused pass over CPU rows of any float
    dtype (two or more); None where the kernels do not take them (then compute the two
    steps)."""
    if reference.fast is None:
        return None
    fast = _fast.feature_drift(rows, reference.fast, eps, weight, TOP_CHANNELS)
    return None if fast is None else _scored(fast)
