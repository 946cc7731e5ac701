"""Inputs the fused kernels must leave to torch's path: lazily negated views, gradients
wanted, arguments torch refuses. A declined call answers NotImplemented and writes
nothing; the layer then gives torch.nn's results (or its error)."""

from __future__ import annotations

import pytest
import torch

import normcore
from normcore import kernels
from normcore.kernels import _loader

from .cases import PER_KIND, Row, rows
from .checks import Spy


def _negated_view(x: torch.Tensor) -> torch.Tensor:
    return torch._neg_view(-x)  # the same values, negated lazily: raw data is -x


@pytest.mark.parametrize("row", rows(PER_KIND))
@pytest.mark.parametrize("how", ["negated view", "gradients wanted"])
def test_inputs_the_kernels_leave_to_torch_get_torch_results(spy: Spy, row: Row,
                                                            how: str) -> None:
    ours, ref = row.pair()
    x = row.input(row.case.shapes[0], scale=2, shift=1)
    for mode in (True, False):
        ours.train(mode)
        ref.train(mode)
        if how == "negated view":
            with torch.no_grad():
                got, want = ours(_negated_view(x)), ref(x)
        else:
            got, want = ours(x.clone().requires_grad_()), ref(x.clone().requires_grad_())
        row.precision.assert_close(got, want)
        row.precision.assert_same_state(ours, ref)
    assert not spy.calls


def test_group_norm_with_a_bool_for_groups_raises_torch_error(spy: Spy) -> None:
    x = torch.randn(2, 4, 3)
    with pytest.raises(TypeError) as expected:
        torch.nn.functional.group_norm(x, True)
    with pytest.raises(TypeError, match=str(expected.value).split(":")[0]):
        normcore.functional.group_norm(x, True)
    assert not spy.calls


def test_a_declined_train_step_writes_nothing() -> None:
    # Each of these fails one check of the kernels' own; the running statistics, their
    # versions and the batch count must come back untouched, and the answer NotImplemented.
    if not kernels.warm_up():
        pytest.skip("the kernels are not available here")
    module = _loader.ops()
    layer = normcore.BatchNorm2d(4)
    weight, bias, mean, var, count = (layer.weight.detach(), layer.bias.detach(),
                                      layer.running_mean, layer.running_var,
                                      layer.num_batches_tracked)
    x = torch.randn(3, 4, 5, 5)
    declined = {
        "half statistics": (x, weight.half(), bias, mean, var, count),
        "wrong channel count": (x, weight, bias, mean[:3], var[:3], count),
        "strided input": (x[:, :, ::2], weight, bias, mean, var, count),
        "int count": (x, weight, bias, mean, var, count.int()),
        "one value per channel": (x[:1, :, :1, :1], weight, bias, mean, var, count),
        "not a tensor": (x.numpy(), weight, bias, mean, var, count),
    }
    shape_past_int64 = (torch.randn(2, 4), (2**70,), None, None, 1e-5, False, 1)
    assert module.layer_norm(*shape_past_int64) is NotImplemented
    versions = (mean._version, var._version, count._version)
    for name, tensors in declined.items():
        result = module.batch_norm_train(*tensors, 0.1, 1e-5, True, True, True, 1)
        assert result is NotImplemented, name
    assert (mean._version, var._version, count._version) == versions
    assert torch.equal(mean, torch.zeros(4))
    assert torch.equal(var, torch.ones(4))
    assert int(count) == 0
