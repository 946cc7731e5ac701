"""Accuracy far from zero and in reduced precision, against float64 references.

(Every family's parity with torch.nn in float16, bfloat16 and float64 runs from the table
in cases.py, in test_parity.)"""

from __future__ import annotations

import pytest
import torch

import normcore
from normcore import kernels

pytestmark = pytest.mark.usefixtures("both_paths")


def _err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref).abs().max())


@pytest.mark.parametrize("offset", [1e2, 1e3, 1e4])
def test_batch_statistics_far_from_zero_are_as_accurate_as_torch(offset: float) -> None:
    # |mean| / std up to 1e4 in float32: a naive E[x^2] - E[x]^2 would lose every digit.
    x = (torch.randn(64, 8, 16, 16, dtype=torch.float64) + offset).float()
    x64 = x.double()
    var64, mean64 = torch.var_mean(x64, dim=[0, 2, 3], correction=0)
    unbiased64 = torch.var(x64, dim=[0, 2, 3], correction=1)
    ref_out = (x64 - mean64[:, None, None]) / (var64[:, None, None] + 1e-5).sqrt()

    ours, ref = normcore.BatchNorm2d(8, momentum=1.0), torch.nn.BatchNorm2d(8, momentum=1.0)
    with torch.no_grad():
        result = ours.normalize(x)
        torch_out = ref(x)
    assert _err(result.var, var64) <= 1e-4 * float(var64.max())
    assert _err(result.mean, mean64) <= 1e-6 * offset
    assert _err(ours.running_var, unbiased64) <= max(_err(ref.running_var, unbiased64), 1e-6)
    assert _err(result.output, ref_out) <= max(_err(torch_out, ref_out), 1e-5)


@pytest.mark.parametrize("kind", ["LayerNorm", "GroupNorm", "RMSNorm", "InstanceNorm1d"])
def test_per_sample_statistics_far_from_zero(kind: str) -> None:
    x = (torch.randn(8, 4, 256, dtype=torch.float64) + 1e4).float()
    x64 = x.double()
    if kind == "LayerNorm":
        layer, ref, dims, shape = normcore.LayerNorm(256), torch.nn.LayerNorm(256), [2], None
    elif kind == "GroupNorm":
        layer, ref = normcore.GroupNorm(2, 4), torch.nn.GroupNorm(2, 4)
        dims, shape = [2], (8, 2, -1)
    elif kind == "RMSNorm":
        layer, ref = normcore.RMSNorm(256), torch.nn.RMSNorm(256)
        with torch.no_grad():
            result = layer.normalize(x)
        ms64 = x64.pow(2).mean(2)
        assert _err(result.mean_square, ms64) <= 1e-6 * float(ms64.max())
        torch.testing.assert_close(result.output, ref(x).detach())
        return
    else:
        layer, ref, dims, shape = normcore.InstanceNorm1d(4), torch.nn.InstanceNorm1d(4), [2], None
    xr = x64.reshape(shape) if shape else x64
    var64, mean64 = torch.var_mean(xr, dim=dims, correction=0)
    with torch.no_grad():
        result = layer.normalize(x)
        torch_out = ref(x)
    assert _err(result.mean, mean64) <= 1e-6 * 1e4
    # float32 inputs at 1e4 are quantized to ~1e-3; var ~1 must keep 3+ digits.
    assert _err(result.var, var64) <= 2e-3
    ref_out = (xr - mean64.unsqueeze(-1)) / (var64.unsqueeze(-1) + 1e-5).sqrt()
    ref_out = ref_out.reshape(x.shape)
    assert _err(result.output, ref_out) <= max(_err(torch_out, ref_out), 1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("affine", [False, True], ids=["plain", "affine"])
@pytest.mark.parametrize("fast", [True, False], ids=["kernels", "torch"])
def test_reduced_precision_running_stats_accumulate_in_float32(dtype, affine: bool,
                                                               fast: bool) -> None:
    # Far from zero, where statistics computed at the input's own precision lose digits
    # (torch.nn's do without an affine weight).
    x = (torch.randn(3, 4, 5, 5) * 3 + 50).to(dtype)
    ours = normcore.InstanceNorm2d(4, affine=affine, track_running_stats=True)
    ref = torch.nn.InstanceNorm2d(4, affine=affine, track_running_stats=True)
    previous = kernels.set_enabled(fast)
    try:
        with torch.no_grad():
            ours(x)
            ref(x)
    finally:
        kernels.set_enabled(previous)
    x64 = x.double()
    expected_var = 0.9 + 0.1 * x64.var(dim=[2, 3]).mean(0)
    expected_mean = 0.1 * x64.mean(dim=[2, 3]).mean(0)
    assert _err(ours.running_var, expected_var) <= 1e-6
    assert _err(ours.running_mean, expected_mean) <= 1e-6
    if not affine:  # torch.nn's own error, float32's with an affine weight
        assert _err(ours.running_var, expected_var) < _err(ref.running_var, expected_var)
