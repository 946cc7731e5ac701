"""The fused kernels on float16, bfloat16 and float64 inputs: they take them (the spy counts
each call, so a silent fallback to torch fails), give torch.nn's results and statistics in
torch's dtypes, round every 2-byte value as torch rounds it, and stream outputs of every
element size."""

from __future__ import annotations

import pytest
import torch

import normcore
from normcore import kernels

from .cases import LARGE, PER_KIND, PRECISIONS, Row, rows
from .checks import Spy, assert_same

# torch.nn.RMSNorm itself warns that mixed dtypes (half input, float32 weight) skip its
# fused kernel.
pytestmark = pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")


@pytest.mark.parametrize("row", rows(PER_KIND, precisions=PRECISIONS))
def test_every_dtype_is_normalized_by_the_kernels(spy: Spy, row: Row) -> None:
    ours, ref = row.pair()
    x = row.input(row.case.shapes[0], scale=2, shift=1)
    assert_same(ours, ref, x, row.precision)
    assert sum(spy.calls.values()) == 3  # two train steps and eval, none left to torch
    for mode in row.case.modes:
        ours.train(mode == "train")
        ref.train(mode == "train")
        before = sum(spy.calls.values())
        with torch.no_grad():
            result = ours.normalize(x)
            row.precision.assert_close(result.output, ref(x))
        assert sum(spy.calls.values()) > before
        assert result.output.dtype == x.dtype
        assert all(stat.dtype == row.precision.state_dtype for stat in result[1:])


@pytest.mark.parametrize("row", rows(PER_KIND + LARGE, precisions=PRECISIONS))
@pytest.mark.usefixtures("output_stores", "two_threads")
def test_outputs_of_every_element_size_are_stored_and_streamed(spy: Spy, row: Row) -> None:
    ours, ref = row.pair()
    # An offset view: the first aligned vector of each row is further in.
    base = row.input((row.case.shapes[0][0] * 2, *row.case.shapes[0][1:]), scale=2, shift=1)
    x = base[1:1 + row.case.shapes[0][0]]
    assert x.is_contiguous()
    assert_same(ours, ref, x, row.precision)
    assert sum(spy.calls.values()) == 3


# Every 2-byte pattern, laid out for the planar loops (vectors, then a tail of 7), the
# column loops (rows of 32: vectors only) and narrow columns (3: scalar code only).
LAYOUTS = {"planes": (1, 1, 65543), "columns": (2048, 32), "narrow columns": (21845, 3)}


def _all_values(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    values = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    values = torch.cat([values, values[:7]])
    n = 1
    for s in shape:
        n *= s
    return values[:n].reshape(shape).clone()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("scale", [1.0, 0.3])
@pytest.mark.usefixtures("output_stores")
def test_every_half_value_is_widened_and_rounded_as_torch_rounds(spy: Spy, dtype, layout,
                                                                 scale) -> None:
    # BatchNorm eval with mean 0, variance 1 and eps 0 is y = x * weight + 0 in float32,
    # rounded to the input's dtype: 1.0 gives every value back, 0.3 rounds each product
    # (subnormals, ties and overflow to Inf among them).
    x = _all_values(dtype, LAYOUTS[layout])
    channels = x.size(1)
    layer = normcore.BatchNorm1d(channels, eps=0.0).eval()
    with torch.no_grad():
        layer.weight.fill_(scale)
        y = layer(x)
    assert spy.calls["batch_norm_eval"] == 1
    weight = torch.tensor(scale, dtype=torch.float32)
    want = (x.float() * weight + torch.zeros((), dtype=torch.float32)).to(dtype)
    nan = want.isnan()
    assert torch.equal(y.isnan(), nan)
    assert torch.equal(y[~nan].view(torch.int16), want[~nan].view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_a_layer_of_the_wrong_dtype_raises_torch_error_not_the_kernels(spy: Spy, dtype
                                                                        ) -> None:
    # float32 parameters under float64 input (and float64 ones under a half input): torch
    # refuses the mix, and so does normcore, without writing a running statistic (torch.nn
    # counts the batch before it raises; normcore checks first).
    layer_dtype = torch.float32 if dtype == torch.float64 else torch.float64
    ours = normcore.BatchNorm2d(4).to(layer_dtype)
    ref = torch.nn.BatchNorm2d(4).to(layer_dtype)
    x = torch.randn(3, 4, 5, 5).to(dtype)
    with pytest.raises(RuntimeError) as expected:
        ref(x)
    with pytest.raises(type(expected.value), match="mixed dtype"):
        ours(x)
    assert not spy.calls
    assert torch.equal(ours.running_mean, ref.running_mean)
    assert int(ours.num_batches_tracked) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64],
                         ids=str)
@pytest.mark.parametrize("shape", [(4, 3, 5), (2, 8, 4, 4), (2, 3, 70_000)])
@pytest.mark.usefixtures("output_stores")
def test_instance_norm_eval_statistics_come_in_the_read_that_normalizes(spy: Spy, dtype,
                                                                        shape) -> None:
    layer = getattr(normcore, f"InstanceNorm{len(shape) - 2}d")(
        shape[1], affine=True, track_running_stats=True)
    layer.to(torch.float64 if dtype == torch.float64 else torch.float32).eval()
    with torch.no_grad():
        layer.running_mean.normal_()
        layer.running_var.uniform_(0.5, 2.0)
        layer.weight.normal_()
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 50).to(dtype)
    with torch.no_grad():
        output, mean, var = layer.normalize(x)
        assert spy.calls["instance_norm_eval_stats"] == 1  # one kernel call
        assert sum(spy.calls.values()) == 1
        assert torch.equal(output, layer(x))  # the same output as forward
    ref_var, ref_mean = torch.var_mean(x.double(), dim=list(range(2, x.dim())), correction=0)
    assert mean.shape == var.shape == shape[:2]
    assert mean.dtype == var.dtype == layer.running_mean.dtype
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64],
                         ids=str)
@pytest.mark.parametrize("fast", [True, False], ids=["kernels", "torch"])
def test_rms_norm_default_eps_is_the_machine_epsilon_of_its_statistics(spy: Spy, dtype,
                                                                       fast: bool) -> None:
    # Values of 1e-4 have a mean square of 1e-8, below float32's epsilon (1.2e-7), and values
    # of 1e-8 one of 1e-16, near float64's (2.2e-16): the output depends on which epsilon is
    # added, float32's for half inputs as in torch.
    ours, ref = normcore.RMSNorm(64), torch.nn.RMSNorm(64)
    ours.to(torch.float64 if dtype == torch.float64 else torch.float32)
    ref.to(torch.float64 if dtype == torch.float64 else torch.float32)
    x = (torch.randn(8, 64, dtype=torch.float64) * (1e-8 if dtype == torch.float64 else 1e-4)
         ).to(dtype)
    previous = kernels.set_enabled(fast)
    try:
        with torch.no_grad():
            output, expected = ours(x), ref(x)
    finally:
        kernels.set_enabled(previous)
    assert bool(spy.calls) == fast
    rtol = {torch.float32: 2e-7, torch.float64: 1e-15}.get(dtype, 0.0)
    torch.testing.assert_close(output, expected, rtol=rtol, atol=0)
    unguarded = x.double() * x.double().pow(2).mean(-1, keepdim=True).rsqrt()
    assert not torch.allclose(output.double(), unguarded, rtol=0.01)  # eps mattered
