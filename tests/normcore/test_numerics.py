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


def _outlier_first(shape: tuple[int, ...], value: float, channels_last: bool = False,
                   rows: bool = False) -> torch.Tensor:
    # Statistics are summed around a set's first value: here that value sits tens to
    # thousands of standard deviations from the mean. The sets: each channel (a
    # BatchNorm1d column; the first value of every plane, the channel's first among them),
    # or with `rows` each row.
    x = torch.randn(shape, dtype=torch.float64)
    if rows:
        x[:, 0] = value
    elif len(shape) == 2:
        x[0] = value
    else:
        x[:, :, *([0] * (len(shape) - 2))] = value
    x = x.float()
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize(("shape", "channels_last"), [
    ((8, 16, 64, 64), False),    # planes, channel by channel
    ((128, 4, 64, 64), False),   # planes, a statistics pass and a scale-and-shift pass
    ((4000, 8), False),          # columns
    ((1_000_000, 1), False),     # one long column
    ((8, 16, 32, 32), True),     # channels_last
], ids=["planes", "two-pass", "columns", "long-column", "channels-last"])
@pytest.mark.parametrize("mode", ["train", "eval-batch-stats"])
def test_an_outlier_first_value_costs_batch_statistics_no_digits(shape, channels_last,
                                                                  mode: str,
                                                                  both_paths: str) -> None:
    # The kernels' statistics keep float32's digits; the torch path is torch.nn's own,
    # which on one column of a million values keeps fewer (its error is the bound there).
    x = _outlier_first(shape, 1e4, channels_last)
    dims = [0, *range(2, x.dim())]
    x64 = x.double()
    var64, mean64 = torch.var_mean(x64, dim=dims, correction=0)
    view = [1, -1] + [1] * (x.dim() - 2)
    ref_out = (x64 - mean64.view(view)) / (var64.view(view) + 1e-5).sqrt()
    layer = normcore.BatchNorm1d(shape[1]) if x.dim() == 2 else normcore.BatchNorm2d(shape[1])
    tolerance = 1e-5 * float(var64.max())
    out_tolerance = 1e-5 * float(ref_out.abs().max())
    if both_paths == "torch":
        ref = torch.nn.BatchNorm1d(shape[1]) if x.dim() == 2 else torch.nn.BatchNorm2d(shape[1])
        with torch.no_grad():
            ref.momentum = 1.0
            torch_out = ref(x)
        tolerance = max(tolerance, _err(ref.running_var, var64) * 1.01)
        out_tolerance = max(out_tolerance, _err(torch_out, ref_out) * 1.01)
    with torch.no_grad():
        if mode == "train":
            layer.momentum = 1.0
            out = layer(x)
            n = x.numel() // shape[1]
            assert _err(layer.running_var, var64 * n / (n - 1)) <= tolerance
        else:
            result = layer.eval().normalize(x)
            assert _err(result.var, var64) <= tolerance
            assert _err(result.mean, mean64) <= 1e-5 * float(var64.max()) ** 0.5
            layer.running_mean.copy_(mean64)
            layer.running_var.copy_(var64)
            out = layer(x)
    assert _err(out, ref_out) <= out_tolerance


@pytest.mark.parametrize("kind", ["LayerNorm", "long-row", "GroupNorm", "InstanceNorm2d",
                                  "InstanceNorm2d-eval"])
def test_an_outlier_first_value_costs_per_sample_statistics_no_digits(kind: str) -> None:
    if kind in ("LayerNorm", "long-row"):
        x = _outlier_first((2, 4096) if kind == "LayerNorm" else (1, 1_000_000), 1e4,
                           rows=True)
        layer, dims = normcore.LayerNorm(x.size(1)), [1]
        groups = x
    else:
        x = _outlier_first((4, 8, 32, 32), 1e4)
        if kind == "GroupNorm":
            layer, groups, dims = normcore.GroupNorm(2, 8), x.view(4, 2, -1), [2]
        else:
            layer = normcore.InstanceNorm2d(8, track_running_stats=True)
            if kind.endswith("eval"):
                layer.eval()
            groups, dims = x, [2, 3]
    g64 = groups.double()
    var64, mean64 = torch.var_mean(g64, dim=dims, correction=0, keepdim=True)
    ref_out = ((g64 - mean64) / (var64 + 1e-5).sqrt()).view(x.shape)
    if not layer.training:  # the running statistics, 0 and 1, normalize
        ref_out = x.double() / (1 + 1e-5) ** 0.5
    with torch.no_grad():
        result = layer.normalize(x)
    assert _err(result.output, ref_out) <= 1e-5 * float(ref_out.abs().max())
    assert _err(result.var, var64.view(result.var.shape)) <= 1e-5 * float(var64.max())


def test_a_variance_beyond_float32_squares_is_still_exact() -> None:
    # Values near 1e17 and a first value of 2e18: its squared distances (4e36) added up in
    # float32 lanes overflow; summed again around the mean, they do not.
    x = torch.randn(2, 2048, dtype=torch.float64) * 1e17
    x[:, 0] = 2e18
    x = x.float()
    x64 = x.double()
    var64, mean64 = torch.var_mean(x64, dim=1, correction=0, keepdim=True)
    with torch.no_grad():
        out = normcore.LayerNorm(2048)(x)
    assert _err(out, (x64 - mean64) / (var64 + 1e-5).sqrt()) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_an_infinite_first_value_gives_torch_infinite_mean(dtype) -> None:
    x = torch.randn(8, 3).to(dtype)
    x[0, 1] = float("inf")
    ours, ref = normcore.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    if dtype == torch.float64:
        ours, ref = ours.double(), ref.double()
    ours.reject_non_finite = False
    with torch.no_grad():
        ours(x)
        ref(x)
    torch.testing.assert_close(ours.running_mean, ref.running_mean, equal_nan=True)
    torch.testing.assert_close(ours.running_var, ref.running_var, equal_nan=True)


@pytest.mark.parametrize("shape", [(128, 4, 64, 64), (8, 16, 64, 64), (4000, 8)],
                         ids=["two-pass", "planes", "columns"])
def test_one_channel_summed_again_leaves_the_others_as_they_were(shape) -> None:
    # Only channel 2 starts with an outlier: it alone is summed again (columns: all of them,
    # in a second pass), and every channel's statistics match float64 and the others match
    # what the same layer gives on the input without the outlier (bit for bit).
    x = torch.randn(shape)
    spiked = x.clone()
    spiked[(0, 2) + (0,) * (x.dim() - 2)] = 1e4
    dims = [0, *range(2, x.dim())]
    plain_layer = normcore.BatchNorm1d(shape[1]) if x.dim() == 2 else normcore.BatchNorm2d(
        shape[1])
    layer = normcore.BatchNorm1d(shape[1]) if x.dim() == 2 else normcore.BatchNorm2d(shape[1])
    with torch.no_grad():
        plain = plain_layer.normalize(spiked.index_fill(1, torch.tensor([2]), 0.0))
        result = layer.normalize(spiked)
    var64, mean64 = torch.var_mean(spiked.double(), dim=dims, correction=0)
    assert _err(result.var, var64) <= 1e-5 * float(var64.max())
    others = [0, 1, 3] + list(range(4, shape[1]))
    assert torch.equal(result.var[others], plain.var[others])
    assert torch.equal(result.mean[others], plain.mean[others])
