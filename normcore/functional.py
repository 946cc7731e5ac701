"""Stateless normalization math, compatible with ``torch.nn.functional``.

``batch_norm``, ``layer_norm``, ``group_norm``, ``instance_norm`` and ``rms_norm`` take
exactly the arguments of their ``torch.nn.functional`` namesakes, return the same output,
update running statistics in place the same way and raise the same errors, so code written
against torch can switch by changing one import.

Contiguous float32, float16, bfloat16 and float64 CPU tensors go through the fused kernels
of ``normcore.kernels`` when they are built and switched on; everything else, and
everything when they are off, through plain torch code. Both give the same results to
torch.nn's tolerances.

The ``*_with_stats`` variants also return the statistics of the input, computed in the
same pass that normalizes it: ``Normalized(output, mean, var)`` with the biased variance,
or ``RMSNormalized(output, mean_square)``. Statistics are float32 for float16/bfloat16
inputs (accumulated in float32, as torch does) and the input's dtype otherwise.

Running statistics (BatchNorm, InstanceNorm) follow torch exactly::

    running_mean = (1 - momentum) * running_mean + momentum * mean
    running_var  = (1 - momentum) * running_var  + momentum * var * m / (m - 1)

where ``var`` is the biased variance over the ``m`` values per channel that normalized the
input. Every check runs before any buffer is written, so a rejected call changes nothing.

The code lives in private modules: ``_running`` (BatchNorm, InstanceNorm), ``_per_sample``
(LayerNorm, RMSNorm, GroupNorm) and ``_stats`` (what they share).
"""

from __future__ import annotations

from ._per_sample import (
    group_norm,
    group_norm_with_stats,
    layer_norm,
    layer_norm_with_stats,
    rms_norm,
    rms_norm_with_stats,
)
from ._running import (
    batch_norm,
    batch_norm_stats,
    batch_norm_with_stats,
    instance_norm,
    instance_norm_with_stats,
)
from ._stats import Normalized, RMSNormalized

__all__ = [
    "Normalized",
    "RMSNormalized",
    "batch_norm",
    "batch_norm_stats",
    "batch_norm_with_stats",
    "group_norm",
    "group_norm_with_stats",
    "instance_norm",
    "instance_norm_with_stats",
    "layer_norm",
    "layer_norm_with_stats",
    "rms_norm",
    "rms_norm_with_stats",
]
