"""normcore layers against torch.nn on the same inputs: outputs, running statistics,
state dicts both ways, and the statistics that ``normalize`` returns against float64."""

from __future__ import annotations

import pytest
import torch

import normcore

from .cases import CASES, FLOAT64, PER_KIND, Case, Row, parity_rows, rows

# torch.nn.RMSNorm itself warns that mixed dtypes skip its fused kernel.
pytestmark = pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")


@pytest.mark.usefixtures("both_paths")
@pytest.mark.parametrize("row", parity_rows())
def test_train_steps_then_eval_match_torch(row: Row) -> None:
    ours, ref = row.pair()
    with torch.no_grad():
        for _ in range(3):
            for shape in row.case.shapes:
                x = row.input(shape, scale=2, shift=0.5)
                row.precision.assert_close(ours.train()(x), ref.train()(x))
                row.precision.assert_same_state(ours, ref)
        for shape in row.case.shapes:
            x = row.input(shape, scale=2, shift=-0.5)
            row.precision.assert_close(ours.eval()(x), ref.eval()(x))
    row.precision.assert_same_state(ours, ref)


# The state dict's dtype is the parameters': float32 under every input but float64.
@pytest.mark.parametrize("row", rows(CASES) + rows(PER_KIND, precisions=[FLOAT64]))
def test_state_dict_loads_both_ways(row: Row) -> None:
    ours, ref = row.pair()
    back = getattr(normcore, row.case.kind)(**row.case.kwargs).to(row.precision.state_dtype)
    fresh_ref = getattr(torch.nn, row.case.kind)(**row.case.kwargs).to(row.precision.state_dtype)
    fresh_ref.load_state_dict(ours.state_dict())
    back.load_state_dict(fresh_ref.state_dict())
    row.precision.assert_same_state(back, ref)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in ref.named_buffers()]


def _reference_stats(case: Case, layer: torch.nn.Module, x: torch.Tensor) -> dict:
    x64 = x.double()
    if case.family == "BatchNorm":
        var, mean = torch.var_mean(x64, dim=[0, *range(2, x.dim())], correction=0)
    elif case.family == "InstanceNorm":
        unbatched = x.dim() == int(case.kind[-2]) + 1
        xb = x64.unsqueeze(0) if unbatched else x64
        var, mean = torch.var_mean(xb, dim=list(range(2, xb.dim())), correction=0)
        if unbatched:
            var, mean = var[0], mean[0]
    elif case.family == "GroupNorm":
        var, mean = torch.var_mean(x64.reshape(x.size(0), layer.num_groups, -1), dim=2,
                                   correction=0)
    else:
        dims = list(range(x.dim() - len(layer.normalized_shape), x.dim()))
        if case.family == "RMSNorm":
            return {"mean_square": x64.pow(2).mean(dims)}
        var, mean = torch.var_mean(x64, dim=dims, correction=0)
    return {"mean": mean, "var": var}


@pytest.mark.usefixtures("both_paths")
@pytest.mark.parametrize("row", parity_rows())
def test_normalize_returns_output_and_batch_statistics(row: Row) -> None:
    ours, ref = row.pair()
    for mode in row.case.modes:
        ours.train(mode == "train")
        ref.train(mode == "train")
        for shape in row.case.shapes:
            x = row.input(shape, scale=3, shift=1)
            with torch.no_grad():
                result = ours.normalize(x)
                expected = ref(x)
            row.precision.assert_close(result.output, expected)
            # Accumulated in float32 or better, whatever the input's precision.
            for name, value in _reference_stats(row.case, ours, x).items():
                got = getattr(result, name)
                assert got.dtype == row.precision.state_dtype
                torch.testing.assert_close(got.double(), value, atol=1e-5, rtol=1e-5, msg=name)
            row.precision.assert_same_state(ours, ref)


@pytest.mark.usefixtures("both_paths")
@pytest.mark.parametrize("row", parity_rows(devices=["cpu"],
                                            where=lambda c: c.tracks_running_stats))
def test_train_override_matches_train_mode_without_switching_the_layer(row: Row) -> None:
    ours, ref = row.pair()
    ours.eval()
    ref.train()
    with torch.no_grad():
        for shape in row.case.shapes:
            x = row.input(shape)
            row.precision.assert_close(ours.normalize(x, train=True).output, ref(x))
            row.precision.assert_same_state(ours, ref)
    assert not ours.training


@pytest.mark.parametrize("row", rows(c for c in PER_KIND if not c.tracks_running_stats))
def test_train_override_is_ignored_without_running_statistics(row: Row) -> None:
    ours, ref = row.pair()
    x = row.input(row.case.shapes[0])
    with torch.no_grad():
        for layer_mode, train in [(True, False), (False, True)]:
            ours.train(layer_mode)
            row.precision.assert_close(ours.normalize(x, train=train).output, ref(x))
    row.precision.assert_same_state(ours, ref)
