"""Calls into the fused drift kernels (``service.core.drift`` has the formula): the score of
a batch's per-channel statistics against a reference, and of the per-feature statistics of
rows, computed and scored in one call. ``None`` for what they do not take, as in ``cpu``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._loader import ops, usable

_STATS = {torch.float32: 0, torch.float64: 3}  # dtype codes of the statistics they take
_ROWS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}  # of rows


def _vectors(n: int, dtype: torch.dtype, *tensors: Tensor) -> bool:
    """Each tensor n contiguous values of ``dtype`` on the CPU, not lazily negated."""
    return all(t.dtype is dtype and t.is_cpu and t.numel() == n and t.is_contiguous()
               and not t.is_neg() for t in tensors)


def drift_reference(mean: Tensor, var: Tensor) -> tuple[int, int, int, int] | None:
    """(address of mean, of var, C, dtype code) of a drift reference the kernels can read
    and fold in place: two contiguous CPU vectors of C values, both float32 or both float64;
    None for any other. Checked once by the caller, who keeps both tensors alive as long as
    it uses the addresses."""
    c = mean.numel()
    code = _STATS.get(mean.dtype)
    if (code is None or c == 0 or mean.dim() != 1 or var.dim() != 1
            or not _vectors(c, mean.dtype, mean, var)):
        return None
    return mean.data_ptr(), var.data_ptr(), c, code


def gaussian_drift(
    mean: Tensor, var: Tensor, unbias: float, ref: tuple[int, int, int, int], eps: float,
    weight: float, top: int,
) -> tuple[float, tuple[tuple[int, float], ...]] | None:
    """(score, its ``top`` channels as (index, J_c)) of a batch's statistics, [C] or per
    instance [N, C] (averaged over N; biased ``var`` times ``unbias``), against a reference
    (``drift_reference``: mean and unbiased var), as ``service.core.drift`` defines it; a
    finite score moves the reference by ``weight`` towards the batch, in place. float32 or
    float64 statistics on the CPU; None for others."""
    c = ref[2]
    shape = mean.shape
    code = _STATS.get(mean.dtype) if usable() else None
    if (code is None or var.dtype is not mean.dtype or not mean.is_cpu or not var.is_cpu
            or shape[-1] != c or var.shape != shape or len(shape) > 2
            or not mean.is_contiguous() or not var.is_contiguous()
            or mean.is_neg() or var.is_neg()):
        return None
    kernels = ops()
    if kernels is None:
        return None
    return kernels.gaussian_drift(
        code, mean.data_ptr(), var.data_ptr(), mean.numel() // c, c, unbias, ref[3], ref[0],
        ref[1], eps, weight, top,
    )


def feature_drift(
    rows: Tensor, ref: tuple[int, int, int, int], eps: float, weight: float, top: int,
) -> tuple[float, tuple[tuple[int, float], ...]] | None:
    """``gaussian_drift`` of the per-column statistics of [R, F] CPU rows (any dtype the
    kernels take), computed in the same call and never stored; None for other rows."""
    shape = rows.shape
    code = _ROWS.get(rows.dtype) if usable() else None
    if (code is None or len(shape) != 2 or shape[1] != ref[2] or shape[0] < 2
            or not rows.is_cpu or not rows.is_contiguous() or rows.is_neg()):
        return None
    kernels = ops()
    if kernels is None:
        return None
    return kernels.feature_drift(
        code, rows.data_ptr(), shape[0], shape[1], 1, ref[3], ref[0], ref[1], eps, weight,
        top, torch.get_num_threads(),
    )
