"""A rejected train forward raises a clear error and leaves every buffer untouched
(torch.nn bumps num_batches_tracked before it checks; normcore must not)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import normcore
from normcore import InputError, NonFiniteError

from .cases import (
    BAD_TRAIN_INPUTS,
    EMPTY,
    LARGE,
    MISMATCHED,
    PER_KIND,
    TOO_FEW_VALUES,
    Row,
    rows,
)

pytestmark = pytest.mark.usefixtures("both_paths")


def _snapshot(layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in layer.state_dict().items()}


def _assert_unchanged(layer: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = layer.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


# LARGE: BatchNorm channels that the kernels normalize one at a time as their statistics
# come, before they know whether the step is refused.
@pytest.mark.parametrize("row", rows(c for c in PER_KIND + LARGE if c.tracks_running_stats))
@pytest.mark.parametrize("problem", BAD_TRAIN_INPUTS)
def test_rejected_train_forward_leaves_buffers_unchanged(row: Row, problem: str) -> None:
    layer, _ = row.pair()
    shape = row.case.shapes[0]
    layer.train()(row.input(shape))  # some history first
    before = _snapshot(layer)
    with pytest.raises(InputError):
        layer(BAD_TRAIN_INPUTS[problem](shape))
    _assert_unchanged(layer, before)


@pytest.mark.parametrize("row", rows(TOO_FEW_VALUES))
def test_one_value_per_channel_raises_value_error_without_counting(row: Row) -> None:
    layer, _ = row.pair()
    layer.train()
    before = _snapshot(layer)
    with pytest.raises(ValueError, match="Expected more than 1"):
        layer(row.input(row.case.shapes[0]))
    _assert_unchanged(layer, before)


def test_torch_itself_counts_the_rejected_batch() -> None:
    # The behaviour normcore deliberately does not copy.
    ref = torch.nn.BatchNorm1d(4)
    with pytest.raises(ValueError, match="Expected more than 1"):
        ref(torch.randn(1, 4))
    assert int(ref.num_batches_tracked) == 1


def test_non_finite_error_names_the_problem() -> None:
    layer = normcore.BatchNorm1d(4)
    with pytest.raises(NonFiniteError, match="non-finite"):
        layer(BAD_TRAIN_INPUTS["NaN"]((8, 4)))


def test_non_finite_values_can_be_allowed_per_layer() -> None:
    ours, ref = normcore.BatchNorm1d(4), torch.nn.BatchNorm1d(4)
    ours.reject_non_finite = False
    x = BAD_TRAIN_INPUTS["Inf"]((8, 4))
    out = ours(x)
    expected = ref(x)
    # Finite channels agree; the poisoned channel is non-finite in both (NaN or Inf).
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(out), finite)
    torch.testing.assert_close(out[finite], expected[finite])
    assert torch.equal(torch.isfinite(ours.running_mean), torch.isfinite(ref.running_mean))


@pytest.mark.parametrize("row", rows(c for c in PER_KIND if c.tracks_running_stats))
def test_a_finite_batch_is_taken_even_if_the_running_statistics_are_not(row: Row) -> None:
    # Only the batch's statistics are judged: a layer loaded with an Inf running variance
    # still learns, exactly as torch.nn does.
    layer, ref = row.pair()
    layer.train(), ref.train()
    for module in (layer, ref):
        module.running_var[0] = math.inf
    x = row.input(row.case.shapes[0])
    torch.testing.assert_close(layer(x), ref(x))
    for ours, theirs in ((layer.running_mean, ref.running_mean),
                         (layer.running_var, ref.running_var)):
        # The first cumulative step (momentum None) takes 0 * Inf: NaN in both.
        torch.testing.assert_close(ours, theirs, equal_nan=True)
    assert int(layer.num_batches_tracked) == int(ref.num_batches_tracked)


def test_eval_mode_accepts_non_finite_values_like_torch() -> None:
    ours, ref = normcore.BatchNorm1d(4).eval(), torch.nn.BatchNorm1d(4).eval()
    x = BAD_TRAIN_INPUTS["NaN"]((8, 4))
    torch.testing.assert_close(ours(x), ref(x), equal_nan=True)


@pytest.mark.parametrize("row", rows(MISMATCHED))
def test_input_that_does_not_fit_the_layer_is_an_input_error(row: Row) -> None:
    layer, ref = row.pair()
    before = _snapshot(layer)
    for shape in row.case.shapes:
        with pytest.raises(InputError, match="expected") as raised:
            layer(row.input(shape))
        # Code that catches what torch.nn raises here catches normcore's error too.
        caught: type[Exception] | None = None
        try:
            with warnings.catch_warnings():  # InstanceNorm warns of the mismatch, then fails
                warnings.simplefilter("ignore")
                ref(row.input(shape))
        except RuntimeError:
            caught = RuntimeError
        except ValueError:
            caught = ValueError
        except IndexError:  # an indexing slip of torch's own on empty channels
            caught = None
        if caught is not None:
            assert isinstance(raised.value, caught)
    _assert_unchanged(layer, before)


def test_group_norm_rejects_indivisible_channels_like_torch() -> None:
    with pytest.raises(ValueError, match="divisible"):
        torch.nn.GroupNorm(4, 6)
    with pytest.raises(ValueError, match="divisible"):
        normcore.GroupNorm(4, 6)


@pytest.mark.parametrize("row", rows(c for c in EMPTY if c.tracks_running_stats))
def test_empty_train_batch_is_refused_without_change(row: Row) -> None:
    # torch.nn would count a batch it learns nothing from, or make InstanceNorm's running
    # statistics NaN; a layer's train step refuses it instead.
    layer, _ = row.pair()
    before = _snapshot(layer)
    for shape in row.case.shapes:
        with pytest.raises(InputError, match="non-empty batch"):
            layer.normalize(row.input(shape), train=True)
    _assert_unchanged(layer, before)


# Eval mode, and train mode without running statistics.
NOT_TRAINED = [p for p in rows(EMPTY, modes=True)
               if p.values[0].mode == "eval" or not p.values[0].case.tracks_running_stats]


@pytest.mark.parametrize("row", NOT_TRAINED)
def test_empty_input_that_trains_nothing_gets_what_torch_nn_gives(row: Row) -> None:
    ours, ref = row.pair()
    ours.train(row.mode == "train")
    ref.train(row.mode == "train")
    for shape in row.case.shapes:
        x = row.input(shape)
        try:
            expected = ref(x)
        except Exception as error:  # any type: it is what gets compared
            with pytest.raises(type(error)):
                ours(x)
            continue
        row.precision.assert_close(ours(x), expected)
        result = ours.normalize(x)
        row.precision.assert_close(result.output, expected)
        assert all(stat.isnan().all() for stat in result[1:])
    row.precision.assert_same_state(ours, ref)


@pytest.mark.parametrize("cls", [normcore.InstanceNorm1d, normcore.InstanceNorm2d,
                                 normcore.InstanceNorm3d])
def test_normalize_answers_an_empty_batch_where_affine_torch_fails(cls) -> None:
    layer = cls(4, affine=True)
    x = torch.empty(0, 4, *[3] * layer._spatial)
    with pytest.raises(IndexError):  # torch.nn's own behaviour, which forward keeps
        getattr(torch.nn, cls.__name__)(4, affine=True)(x)
    result = layer.normalize(x)
    assert result.output.shape == x.shape
    assert result.mean.shape == result.var.shape == (0, 4)


def test_finite_statistics_whose_sum_overflows_are_not_rejected() -> None:
    # 64 channels of variance ~1e37: finite each, but their float32 sum overflows, which
    # a cheap finiteness test must not mistake for an Inf.
    ours, ref = normcore.BatchNorm1d(64), torch.nn.BatchNorm1d(64)
    x = torch.tensor([3.2e18, -3.2e18]).repeat(4).view(8, 1).expand(8, 64).contiguous()
    assert not torch.isfinite(torch.var_mean(x, 0)[0].sum())
    with torch.no_grad():  # the kernels take no autograd
        torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.running_var, ref.running_var)
    assert int(ours.num_batches_tracked) == 1


@pytest.mark.parametrize(("eps", "train", "track"), [
    (0.0, True, True), (-1e-3, True, True), (-1e-3, False, True), (0.0, False, False),
    (0.0, False, True),
], ids=["zero-train", "negative-train", "negative-eval", "zero-eval-batch-stats",
        "zero-eval"])
def test_batch_norm_eps_is_checked_as_torch_checks_it(eps: float, train: bool,
                                                      track: bool) -> None:
    # torch.nn.functional.batch_norm: eps > 0 with batch statistics, eps >= 0 always.
    x = torch.randn(4, 3, 5)
    ours = normcore.BatchNorm1d(3, eps=eps, track_running_stats=track).train(train)
    ref = torch.nn.BatchNorm1d(3, eps=eps, track_running_stats=track).train(train)
    before = _snapshot(ours)
    try:
        expected = ref(x)
    except ValueError as refused:
        with pytest.raises(InputError, match=str(refused).replace("-", r"\-")):
            ours(x)
        with pytest.raises(InputError, match="batch_norm eps"):
            ours.normalize(x)
        with pytest.raises(InputError, match="batch_norm eps"):
            normcore.functional.batch_norm(x, ours.running_mean, ours.running_var,
                                           training=train or not track, eps=eps)
        _assert_unchanged(ours, before)
        return
    torch.testing.assert_close(ours(x), expected)
