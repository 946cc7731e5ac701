"""A rejected train forward raises a clear error and leaves every buffer untouched
(torch.nn bumps num_batches_tracked before it checks; normcore must not)."""

from __future__ import annotations

import math

import pytest
import torch

import normcore
from normcore import InputError, NonFiniteError

pytestmark = pytest.mark.usefixtures("both_paths")


def _snapshot(layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in layer.state_dict().items()}


def _with_value(shape: tuple[int, ...], value: float) -> torch.Tensor:
    x = torch.randn(shape)
    x.view(-1)[3] = value
    return x


LAYERS = {
    "BatchNorm1d": lambda: normcore.BatchNorm1d(4),
    "BatchNorm2d": lambda: normcore.BatchNorm2d(4, momentum=None),
    "BatchNorm3d": lambda: normcore.BatchNorm3d(4),
    "InstanceNorm1d": lambda: normcore.InstanceNorm1d(4, affine=True, track_running_stats=True),
    "InstanceNorm2d": lambda: normcore.InstanceNorm2d(4, track_running_stats=True),
}
GOOD_SHAPE = {
    "BatchNorm1d": (8, 4), "BatchNorm2d": (2, 4, 3, 3), "BatchNorm3d": (2, 4, 2, 2, 2),
    "InstanceNorm1d": (2, 4, 6), "InstanceNorm2d": (2, 4, 3, 3),
}
BAD_INPUTS = {
    "wrong channel count": lambda s: torch.randn(s[0], s[1] + 1, *s[2:]),
    "wrong rank": lambda s: torch.randn(*s, 2, 2),
    "NaN": lambda s: _with_value(s, math.nan),
    "Inf": lambda s: _with_value(s, math.inf),
    "-Inf": lambda s: _with_value(s, -math.inf),
    "integer dtype": lambda s: torch.ones(s, dtype=torch.long),
}


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("problem", BAD_INPUTS)
def test_rejected_train_forward_leaves_buffers_unchanged(kind: str, problem: str) -> None:
    layer = LAYERS[kind]().train()
    layer(torch.randn(GOOD_SHAPE[kind]))  # some history first
    before = _snapshot(layer)
    with pytest.raises(InputError):
        layer(BAD_INPUTS[problem](GOOD_SHAPE[kind]))
    after = layer.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


@pytest.mark.parametrize(
    ("layer", "x"),
    [
        (normcore.BatchNorm1d(4), torch.randn(1, 4)),
        (normcore.BatchNorm2d(4), torch.randn(1, 4, 1, 1)),
        (normcore.InstanceNorm1d(4, track_running_stats=True), torch.randn(3, 4, 1)),
        (normcore.GroupNorm(4, 4), torch.randn(1, 4)),
    ],
    ids=["bn1d", "bn2d", "in1d", "gn"],
)
def test_one_value_per_channel_raises_value_error_without_counting(layer, x) -> None:
    layer.train()
    before = _snapshot(layer)
    with pytest.raises(ValueError, match="Expected more than 1"):
        layer(x)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_torch_itself_counts_the_rejected_batch() -> None:
    # The behaviour normcore deliberately does not copy.
    ref = torch.nn.BatchNorm1d(4)
    with pytest.raises(ValueError, match="Expected more than 1"):
        ref(torch.randn(1, 4))
    assert int(ref.num_batches_tracked) == 1


def test_non_finite_error_names_the_problem() -> None:
    layer = normcore.BatchNorm1d(4)
    with pytest.raises(NonFiniteError, match="non-finite"):
        layer(_with_value((8, 4), math.nan))


def test_non_finite_values_can_be_allowed_per_layer() -> None:
    ours, ref = normcore.BatchNorm1d(4), torch.nn.BatchNorm1d(4)
    ours.reject_non_finite = False
    x = _with_value((8, 4), math.inf)
    out = ours(x)
    expected = ref(x)
    # Finite channels agree; the poisoned channel is non-finite in both (NaN or Inf).
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(out), finite)
    torch.testing.assert_close(out[finite], expected[finite])
    assert torch.equal(torch.isfinite(ours.running_mean), torch.isfinite(ref.running_mean))


def test_eval_mode_accepts_non_finite_values_like_torch() -> None:
    ours, ref = normcore.BatchNorm1d(4).eval(), torch.nn.BatchNorm1d(4).eval()
    x = _with_value((8, 4), math.nan)
    torch.testing.assert_close(ours(x), ref(x), equal_nan=True)


@pytest.mark.parametrize(
    ("layer", "x"),
    [
        (normcore.LayerNorm([5]), torch.randn(3, 4)),
        (normcore.RMSNorm([2, 5]), torch.randn(3, 5, 2)),
        (normcore.GroupNorm(2, 4), torch.randn(3, 6, 2)),
        (normcore.InstanceNorm1d(4, affine=True), torch.randn(3, 5, 2)),
    ],
    ids=["ln", "rms", "gn", "in"],
)
def test_shape_mismatch_is_an_input_error(layer, x) -> None:
    with pytest.raises(InputError, match="expected"):
        layer(x)


def test_group_norm_rejects_indivisible_channels_like_torch() -> None:
    with pytest.raises(ValueError, match="divisible"):
        torch.nn.GroupNorm(4, 6)
    with pytest.raises(ValueError, match="divisible"):
        normcore.GroupNorm(4, 6)


@pytest.mark.parametrize(
    ("layer", "x"),
    [(normcore.BatchNorm1d(4), torch.zeros(0, 4)),
     (normcore.BatchNorm2d(4), torch.zeros(0, 4, 2, 2)),
     (normcore.InstanceNorm1d(4, track_running_stats=True), torch.zeros(0, 4, 3))],
    ids=["bn1d", "bn2d", "in1d"],
)
def test_empty_train_batch_is_refused_without_change(layer, x) -> None:
    before = _snapshot(layer)
    with pytest.raises(InputError, match="non-empty batch"):
        layer.normalize(x, train=True)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_empty_batch_normalizes_to_empty_like_torch(dtype) -> None:
    x = torch.zeros(0, 32, 5, dtype=dtype)
    result = normcore.GroupNorm(8, 32).normalize(x)
    assert result.output.shape == torch.nn.GroupNorm(8, 32)(x).shape
    assert result.mean.shape == (0, 8)
