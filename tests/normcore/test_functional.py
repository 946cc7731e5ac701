"""normcore.functional against torch.nn.functional on every row of the table: the same
output or the same error, and the same in-place effect on the tensors passed in. The
``*_with_stats`` variants return that same output and change the same tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

import normcore
import normcore.functional as F

from .cases import (
    BFLOAT16,
    EMPTY,
    FLOAT32,
    FUNCTIONAL_CASES,
    MISMATCHED,
    OTHER_PRECISIONS,
    PER_KIND,
    TOO_FEW_VALUES,
    Row,
    rows,
)

# torch.nn.functional.rms_norm itself warns that mixed dtypes skip its fused kernel.
pytestmark = pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")


def _copies(args: list) -> list:
    return [a.clone() if isinstance(a, torch.Tensor) else a for a in args]


def _tensors(args: list) -> list[torch.Tensor]:
    return [a for a in args if isinstance(a, torch.Tensor)]


def _call(fn, x: torch.Tensor, args: list, kwargs: dict):
    """(result, None), or (None, the exception) if ``fn`` raised."""
    try:
        return fn(x, *args, **kwargs), None
    except Exception as error:  # any type: it is what gets compared
        return None, error


def _assert_same_tensors(ours: list, theirs: list, row: Row) -> None:
    for mine, ref in zip(_tensors(ours), _tensors(theirs), strict=True):
        torch.testing.assert_close(mine, ref, atol=row.precision.state_tol,
                                   rtol=row.precision.state_tol, equal_nan=True)


def _check(row: Row, x: torch.Tensor, name: str, args: list, kwargs: dict) -> None:
    ref_args, ours_args, stats_args = _copies(args), _copies(args), _copies(args)
    expected, error = _call(getattr(TF, name), x, ref_args, kwargs)
    if error is not None:
        with pytest.raises(type(error)):
            getattr(F, name)(x, *ours_args, **kwargs)
        with pytest.raises(type(error)):
            getattr(F, f"{name}_with_stats")(x, *stats_args, **kwargs)
        _assert_same_tensors(ours_args, args, row)  # refused: nothing written
        _assert_same_tensors(stats_args, args, row)
        return
    row.precision.assert_close(getattr(F, name)(x, *ours_args, **kwargs), expected)
    _assert_same_tensors(ours_args, ref_args, row)
    result = getattr(F, f"{name}_with_stats")(x, *stats_args, **kwargs)
    row.precision.assert_close(result.output, expected)
    _assert_same_tensors(stats_args, ref_args, row)
    assert all(stat.dtype == row.precision.state_dtype for stat in result[1:])


FUNCTIONAL = (
    rows(FUNCTIONAL_CASES)
    + rows(PER_KIND, precisions=OTHER_PRECISIONS)
    + rows(TOO_FEW_VALUES + MISMATCHED)
)


@pytest.mark.usefixtures("both_paths")
@pytest.mark.parametrize("row", FUNCTIONAL)
def test_functional_matches_torch(row: Row) -> None:
    layer = row.case.reference(row.precision)
    for mode in row.case.modes:
        name, args, kwargs = row.case.functional_call(layer, mode)
        for shape in row.case.shapes:
            _check(row, row.input(shape, scale=2, shift=1), name, args, kwargs)


# The kernels take no empty input: one path is enough.
@pytest.mark.parametrize("row", rows(EMPTY, precisions=(FLOAT32, BFLOAT16), modes=True))
def test_empty_input_gets_what_torch_gives(row: Row) -> None:
    # Over an empty batch torch leaves BatchNorm's running statistics alone and makes
    # InstanceNorm's NaN; both come out the same here.
    name, args, kwargs = row.case.functional_call(row.case.reference(row.precision), row.mode)
    for shape in row.case.shapes:
        _check(row, row.input(shape), name, args, kwargs)


def test_torch_example_of_an_empty_batch_norm_gives_an_empty_tensor() -> None:
    running_mean, running_var = torch.empty(0), torch.empty(0)
    out = F.batch_norm(torch.empty(0), running_mean, running_var, training=True)
    expected = TF.batch_norm(torch.empty(0), torch.empty(0), torch.empty(0), training=True)
    torch.testing.assert_close(out, expected)
    assert running_mean.shape == running_var.shape == (0,)


def test_module_forward_with_momentum_none_uses_cumulative_average() -> None:
    # F.batch_norm with momentum=1/k after k steps is what momentum=None means in a module.
    layer = normcore.BatchNorm1d(3, momentum=None)
    batches = [torch.randn(16, 3) * (i + 1) + i for i in range(5)]
    with torch.no_grad():
        for b in batches:
            layer(b)
    expected_mean = torch.stack([b.mean(0) for b in batches]).mean(0)
    expected_var = torch.stack([b.var(0, unbiased=True) for b in batches]).mean(0)
    torch.testing.assert_close(layer.running_mean, expected_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.running_var, expected_var, atol=1e-4, rtol=1e-5)
    assert int(layer.num_batches_tracked) == 5
