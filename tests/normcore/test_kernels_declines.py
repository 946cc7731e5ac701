"""Inputs the fused kernels must leave to torch's path: lazily negated views, gradients
wanted, forward-mode tangents, arguments torch refuses. A declined call answers
NotImplemented and writes nothing; the layer then gives torch.nn's results (or its
error)."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwad

import normcore
from normcore import kernels
from normcore.kernels import _loader

from .cases import PER_KIND, Row, rows
from .checks import Spy


def _negated_view(x: torch.Tensor) -> torch.Tensor:
    return torch._neg_view(-x)  # the same values, negated lazily: raw data is -x


@pytest.mark.parametrize("row", rows(PER_KIND))
@pytest.mark.parametrize("how", ["negated view", "gradients wanted", "forward-mode tangent"])
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
        elif how == "forward-mode tangent":  # with gradients off, as forward AD allows
            tangent = row.input(row.case.shapes[0], scale=3, shift=0)
            with torch.no_grad(), fwad.dual_level():
                got = fwad.unpack_dual(ours(fwad.make_dual(x, tangent)))
                want = fwad.unpack_dual(ref(fwad.make_dual(x, tangent)))
            assert got.tangent is not None
            row.precision.assert_close(got.tangent, want.tangent)
            got, want = got.primal, want.primal
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


class _Sub(torch.Tensor):
    pass


@pytest.mark.parametrize("row", rows(PER_KIND))
def test_a_tensor_subclass_keeps_its_class_through_torch_path(spy: Spy, row: Row) -> None:
    ours, ref = row.pair()
    x = row.input(row.case.shapes[0], scale=2, shift=1).as_subclass(_Sub)
    with torch.no_grad():
        got, want = ours(x), ref(x)
    assert type(got) is type(want) is _Sub
    row.precision.assert_close(got.as_subclass(torch.Tensor), want.as_subclass(torch.Tensor))
    assert not spy.calls


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_functionalized_and_nested_inputs_are_left_to_torch(spy: Spy) -> None:
    x = torch.randn(3, 5)
    out = torch.func.functionalize(lambda t: normcore.functional.layer_norm(t, (5,)))(x)
    torch.testing.assert_close(out, torch.nn.functional.layer_norm(x, (5,)))
    nested = torch.nested.nested_tensor([torch.ones(2, 3), torch.ones(2, 4)])
    with pytest.raises(RuntimeError):
        normcore.functional.batch_norm(nested, None, None, training=True)
    assert not spy.calls


@pytest.mark.parametrize("fast", [True, False], ids=["kernels", "torch"])
@pytest.mark.parametrize("make", [
    lambda: normcore.BatchNorm2d(3),
    lambda: normcore.InstanceNorm2d(3, track_running_stats=True),
], ids=["BatchNorm2d", "InstanceNorm2d"])
def test_inference_buffers_refuse_a_train_step_outside_inference_mode(make, fast: bool) -> None:
    with torch.inference_mode():
        layer = make()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    previous = kernels.set_enabled(fast)
    try:
        with torch.no_grad(), pytest.raises(RuntimeError, match="inference tensor"):
            layer.train()(torch.randn(2, 3, 4, 4))
    finally:
        kernels.set_enabled(previous)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key
    with torch.inference_mode():  # where it is allowed
        layer(torch.randn(2, 3, 4, 4))


def test_arguments_past_int64_are_declined_not_raised() -> None:
    if not kernels.warm_up():
        pytest.skip("the kernels are not available here")
    module = _loader.ops()
    x = torch.randn(2, 4, 3)
    assert module.rms_norm(x, (2**70, 1.5), None, None, False, 1) is NotImplemented
    assert module.group_norm(x, 2**70, None, None, 1e-5, True, True, 1) is NotImplemented


def test_a_lone_running_statistic_of_the_wrong_size_is_refused_in_eval() -> None:
    from normcore._running import run_batch_norm

    with pytest.raises(RuntimeError, match="running_mean should contain 3 elements not 7"):
        run_batch_norm(torch.randn(4, 3), torch.zeros(7), None, None, None, False, 0.1, 1e-5)


@pytest.mark.parametrize("dual_of", ["weight", "a view of the input"])
def test_a_tangent_on_a_weight_or_a_view_reaches_the_output(spy: Spy, dual_of: str) -> None:
    x, weight, tangent = torch.randn(4, 8, 5, 5), torch.randn(8), torch.randn(8)
    with torch.no_grad(), fwad.dual_level():
        if dual_of == "weight":
            inputs = (x, None, None, fwad.make_dual(weight, tangent), None, True, 0.1, 1e-5)
        else:  # the view of a dual tensor carries the matching view of its tangent
            big = fwad.make_dual(torch.randn(8, 8, 5, 5), torch.randn(8, 8, 5, 5))
            inputs = (big[:4], None, None, weight, None, True, 0.1, 1e-5)
        got = fwad.unpack_dual(normcore.functional.batch_norm(*inputs))
        want = fwad.unpack_dual(torch.nn.functional.batch_norm(*inputs))
    assert got.tangent is not None
    torch.testing.assert_close(got.tangent, want.tangent)
    torch.testing.assert_close(got.primal, want.primal)
    assert not spy.calls
