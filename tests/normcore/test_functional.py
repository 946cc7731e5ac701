"""normcore.functional against torch.nn.functional: same arguments, same outputs, same
in-place running-statistic updates, same errors for the same bad arguments."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

import normcore.functional as F

pytestmark = pytest.mark.usefixtures("both_paths")


def _buffers(c: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(c), torch.rand(c) + 0.5


def _call_both(name: str, x: torch.Tensor, *args, **kwargs):
    """Run ours and torch's on separate copies of every tensor argument."""

    def copies():
        a = [t.clone() if isinstance(t, torch.Tensor) else t for t in args]
        k = {n: t.clone() if isinstance(t, torch.Tensor) else t for n, t in kwargs.items()}
        return a, k

    ours_args, ours_kwargs = copies()
    ref_args, ref_kwargs = copies()
    ours = getattr(F, name)(x, *ours_args, **ours_kwargs)
    ref = getattr(TF, name)(x, *ref_args, **ref_kwargs)
    return ours, ref, (ours_args, ours_kwargs), (ref_args, ref_kwargs)


CALLS = [
    ("batch_norm", (4, 3, 5), lambda: (*_buffers(3),), {"training": True, "momentum": 0.2}),
    ("batch_norm", (4, 3, 5), lambda: (*_buffers(3),), {"training": False}),
    ("batch_norm", (8, 3), lambda: (None, None), {"training": True}),
    ("batch_norm", (4, 3, 2, 2), lambda: (*_buffers(3), torch.randn(3), torch.randn(3), True,
                                          0.3, 1e-3), {}),
    ("instance_norm", (4, 3, 5), lambda: (), {}),
    ("instance_norm", (4, 3, 5, 2), lambda: (*_buffers(3),), {"momentum": 0.4}),
    ("instance_norm", (4, 3, 5), lambda: (*_buffers(3),), {"use_input_stats": False}),
    ("layer_norm", (4, 3, 5), lambda: ([5], torch.randn(5), torch.randn(5)), {"eps": 1e-3}),
    ("layer_norm", (4, 3, 5), lambda: ((3, 5),), {}),
    ("group_norm", (4, 6, 5), lambda: (3, torch.randn(6), torch.randn(6)), {}),
    ("group_norm", (2, 4), lambda: (2,), {"eps": 1e-2}),
    ("rms_norm", (4, 3, 5), lambda: ([5], torch.randn(5)), {}),
    ("rms_norm", (4, 3, 5), lambda: ([3, 5],), {"eps": 1e-4}),
]


@pytest.mark.parametrize(("name", "shape", "make_args", "kwargs"), CALLS)
def test_functional_matches_torch(name, shape, make_args, kwargs) -> None:
    x = torch.randn(shape) * 2 + 1
    ours, ref, (ours_args, ours_kwargs), (ref_args, ref_kwargs) = _call_both(
        name, x, *make_args(), **kwargs
    )
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    # Running statistics passed in are updated in place the same way.
    for mine, theirs in zip([*ours_args, *ours_kwargs.values()],
                            [*ref_args, *ref_kwargs.values()], strict=True):
        if isinstance(mine, torch.Tensor):
            torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(("name", "shape", "make_args", "kwargs"), CALLS)
def test_with_stats_variant_returns_same_output(name, shape, make_args, kwargs) -> None:
    x = torch.randn(shape)
    args = make_args()
    plain = getattr(F, name)(x, *[a.clone() if isinstance(a, torch.Tensor) else a for a in args],
                             **kwargs)
    result = getattr(F, f"{name}_with_stats")(x, *args, **kwargs)
    torch.testing.assert_close(result.output, plain)


BAD_CALLS = [
    # one value per channel in training
    ("batch_norm", (1, 3), lambda: (*_buffers(3),), {"training": True}),
    # running statistics of the wrong size
    ("batch_norm", (4, 3), lambda: (*_buffers(4),), {"training": True}),
    ("batch_norm", (4, 3), lambda: (torch.zeros(1), torch.ones(1)), {"training": True}),
    # eval mode without running statistics
    ("batch_norm", (4, 3), lambda: (None, None), {"training": False}),
    ("instance_norm", (4, 3, 1), lambda: (), {}),
    ("instance_norm", (4, 3, 5), lambda: (*_buffers(2),), {}),
    ("group_norm", (4, 6, 5), lambda: (4,), {}),
    ("group_norm", (6,), lambda: (3,), {}),
    ("group_norm", (1, 4), lambda: (4,), {}),
    ("layer_norm", (4, 3), lambda: ([5],), {}),
    ("rms_norm", (4, 3), lambda: ([5],), {}),
]


@pytest.mark.parametrize(("name", "shape", "make_args", "kwargs"), BAD_CALLS)
def test_bad_arguments_raise_what_torch_raises_and_change_nothing(
    name, shape, make_args, kwargs
) -> None:
    x = torch.randn(shape)
    args = make_args()
    with pytest.raises(Exception) as ref_error:  # noqa: PT011 - the type is what we compare
        getattr(TF, name)(x, *[a.clone() if isinstance(a, torch.Tensor) else a for a in args],
                          **kwargs)
    before = [a.clone() for a in args if isinstance(a, torch.Tensor)]
    with pytest.raises(ref_error.type):
        getattr(F, name)(x, *args, **kwargs)
    after = [a for a in args if isinstance(a, torch.Tensor)]
    for b, a in zip(before, after, strict=True):
        assert torch.equal(a, b)


def test_module_forward_with_momentum_none_uses_cumulative_average() -> None:
    # F.batch_norm with momentum=1/k after k steps is what momentum=None means in a module.
    import normcore

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
