"""The drift score's math: the formula against a float64 reference written here, on the
fused path and the torch path alike; its scale (a shift of one standard deviation and a
variance 4x score alike) and its noise for batches drawn from the reference itself."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from normcore import kernels
from normcore.kernels import drift as _fast
from service.core.drift import (
    INPUT_MOMENTUM,
    MAX_ROWS,
    NO_DRIFT,
    TOP_CHANNELS,
    Moments,
    Reference,
    drift,
    feature_drift,
    feature_moments,
    feature_rows,
    fold_weight,
    start,
    symmetric_kl,
)

EPS = 1e-5


@pytest.fixture(params=["kernels", "torch"])
def path(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every check runs on the fused kernels (where built) and on plain torch."""
    if request.param == "kernels" and not kernels.warm_up():
        pytest.skip("the kernels are not available here")
    previous = kernels.set_enabled(request.param == "kernels")
    yield request.param
    kernels.set_enabled(previous)


def _kl(m1: np.ndarray, v1: np.ndarray, m2: np.ndarray, v2: np.ndarray) -> np.ndarray:
    """KL(N(m1, v1) || N(m2, v2)), float64, from its definition."""
    return 0.5 * (np.log(v2 / v1) + (v1 + (m1 - m2) ** 2) / v2 - 1)


def _reference(batch: Moments, ref_mean: torch.Tensor, ref_var: torch.Tensor,
               eps: float = EPS) -> np.ndarray:
    """J per channel in float64: the symmetric KL of the batch's Gaussian (instances
    averaged, unbiased var) and the reference's, both variances plus eps."""
    mean, var = batch.mean.double().numpy(), batch.var.double().numpy()
    if mean.ndim == 2:
        mean, var = mean.mean(0), var.mean(0)
    v1 = var * batch.count / (batch.count - 1) + eps
    m2, v2 = ref_mean.double().numpy(), ref_var.double().numpy() + eps
    return _kl(mean, v1, m2, v2) + _kl(m2, v2, mean, v1)


def _random_case(rng: np.random.Generator, shape: tuple[int, ...], count: int):
    mean = torch.from_numpy(rng.normal(0, 2, shape).astype(np.float32))
    var = torch.from_numpy(rng.gamma(2.0, 1.0, shape).astype(np.float32))
    channels = shape[-1]
    ref_mean = torch.from_numpy(rng.normal(0, 2, channels).astype(np.float32))
    ref_var = torch.from_numpy(rng.gamma(2.0, 1.0, channels).astype(np.float32))
    return Moments(mean, var, count), ref_mean, ref_var


# --- the formula ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_symmetric_kl_is_the_sum_of_both_kl_divergences(dtype: torch.dtype) -> None:
    rng = np.random.default_rng(0)
    m1, m2 = rng.normal(0, 3, 257), rng.normal(0, 3, 257)
    v1, v2 = rng.gamma(1.5, 2.0, 257) + 1e-3, rng.gamma(1.5, 2.0, 257) + 1e-3
    got = symmetric_kl(*(torch.tensor(a, dtype=dtype) for a in (m1, v1, m2, v2)))
    expected = _kl(m1, v1, m2, v2) + _kl(m2, v2, m1, v1)
    rtol = 1e-4 if dtype == torch.float32 else 1e-10
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=rtol, atol=1e-6)


@pytest.mark.parametrize(("shape", "count"), [((1,), 2), ((64,), 8), ((1000,), 4096),
                                              ((5, 16), 10), ((1, 3), 100)])
def test_score_and_top_channels_match_the_float64_reference(path: str, shape, count) -> None:
    batch, ref_mean, ref_var = _random_case(np.random.default_rng(len(shape) + count),
                                            shape, count)
    expected = _reference(batch, ref_mean, ref_var)
    got = drift(batch, Reference(ref_mean, ref_var), EPS)
    assert got.score == pytest.approx(expected.mean(), rel=1e-5)
    order = np.argsort(-expected, kind="stable")[:TOP_CHANNELS]
    assert [c for c, _ in got.channels] == order.tolist()
    np.testing.assert_allclose([j for _, j in got.channels], expected[order], rtol=1e-5)


def test_fold_moves_the_reference_by_its_weight_towards_the_batch(path: str) -> None:
    batch, ref_mean, ref_var = _random_case(np.random.default_rng(3), (4, 32), 12)
    before_mean, before_var = ref_mean.clone(), ref_var.clone()
    scored = drift(batch, Reference(ref_mean, ref_var), EPS, weight=0.25)
    # Scored against the reference as it was, then moved.
    assert scored.score == pytest.approx(_reference(batch, before_mean, before_var).mean(),
                                         rel=1e-5)
    mean, var = batch.mean.mean(0), batch.var.mean(0) * 12 / 11
    torch.testing.assert_close(ref_mean, before_mean + 0.25 * (mean - before_mean))
    torch.testing.assert_close(ref_var, before_var + 0.25 * (var - before_var))


def test_fold_weight_is_a_cumulative_average_then_the_momentum() -> None:
    assert [fold_weight(n) for n in (2, 4, 10)] == [0.5, 0.25, 0.1]
    assert fold_weight(1000) == INPUT_MOMENTUM


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16,
                                   torch.float64], ids=str)
@pytest.mark.parametrize("rows", [3, 64, 5000])
def test_fused_feature_drift_equals_its_two_steps(rows: int, dtype: torch.dtype) -> None:
    if not kernels.warm_up():
        pytest.skip("the kernels are not available here")
    # Far from zero: the statistics must stay stable.
    x = (torch.randn(rows, 48, dtype=torch.float64) * 3 + 100).to(dtype)
    flat = feature_rows(x, 48)
    if rows > MAX_ROWS:
        assert MAX_ROWS // 2 < flat.size(0) <= MAX_ROWS
        assert flat.is_contiguous()
    else:
        assert flat.size(0) == rows
    # A reference of the statistics' dtype: float64 under float64 rows, else float32.
    reference = start(feature_moments((torch.randn(256, 48) * 3 + 100).to(dtype)))
    twin = Reference(reference.mean.clone(), reference.var.clone())
    fused = feature_drift(flat, reference, EPS, 0.1)
    assert fused is not None  # the kernels took the rows
    two_steps = drift(feature_moments(flat), twin, EPS, 0.1)
    assert fused.score == pytest.approx(two_steps.score, rel=1e-4)
    assert [c for c, _ in fused.channels] == [c for c, _ in two_steps.channels]
    torch.testing.assert_close(reference.mean, twin.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reference.var, twin.var, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("stats", "ref"), [(torch.float64, torch.float64),
                                             (torch.float64, torch.float32),
                                             (torch.float32, torch.float64)], ids=str)
def test_float64_statistics_and_references_are_scored_by_the_kernels(stats, ref) -> None:
    if not kernels.warm_up():
        pytest.skip("the kernels are not available here")
    batch, ref_mean, ref_var = _random_case(np.random.default_rng(5), (5, 16), 10)
    batch = Moments(batch.mean.to(stats), batch.var.to(stats), batch.count)
    ref_mean, ref_var = ref_mean.to(ref), ref_var.to(ref)
    expected = _reference(batch, ref_mean, ref_var)
    moved = (batch.mean.double().mean(0) + ref_mean.double()) / 2  # halfway to the batch
    reference = Reference(ref_mean, ref_var)
    assert reference.fast is not None
    got = _fast.gaussian_drift(batch.mean, batch.var, 10 / 9, reference.fast, EPS, 0.5,
                               TOP_CHANNELS)
    assert got is not None
    assert got[0] == pytest.approx(expected.mean(), rel=1e-5)
    torch.testing.assert_close(reference.mean, moved.to(ref))


def test_no_score_without_a_variance_or_with_non_finite_statistics(path: str) -> None:
    _, ref_mean, ref_var = _random_case(np.random.default_rng(4), (8,), 4)
    reference = Reference(ref_mean, ref_var)
    one_value = Moments(torch.randn(8), torch.zeros(8), 1)
    assert drift(one_value, reference, EPS) is NO_DRIFT
    nan = Moments(torch.full((8,), float("nan")), torch.ones(8), 16)
    before = ref_mean.clone()
    assert drift(nan, reference, EPS, weight=0.5) is NO_DRIFT
    assert torch.equal(ref_mean, before)  # nothing folded
    assert start(nan) is None


# --- scale and noise ----------------------------------------------------------------------


def _batches(rng: np.random.Generator, n: int, m: int, channels: int, shift: float = 0.0,
             scale: float = 1.0) -> list[Moments]:
    """``n`` batches of ``m`` values per channel from N(shift, scale^2) per channel."""
    out = []
    for _ in range(n):
        x = torch.from_numpy(rng.normal(shift, scale, (m, channels)).astype(np.float32))
        var, mean = torch.var_mean(x, 0, correction=0)
        out.append(Moments(mean, var, m))
    return out


def _scores(batches: list[Moments]) -> np.ndarray:
    channels = batches[0].mean.numel()
    reference = Reference(torch.zeros(channels), torch.ones(channels))
    return np.array([drift(b, reference, EPS).score for b in batches])


@pytest.mark.parametrize("m", [8, 32, 128, 1024])
def test_batches_like_the_reference_score_about_two_over_m(m: int) -> None:
    scores = _scores(_batches(np.random.default_rng(m), 200, m, 64))
    # Sampling noise alone: 2/m for large m, somewhat more for small m (skewed variance).
    assert 1.8 / m < scores.mean() < (3.5 if m < 30 else 2.4) / m
    assert scores.std() < 1.0 / m  # stable from batch to batch


def test_a_mean_shift_of_one_sd_and_a_variance_4x_score_alike() -> None:
    rng = np.random.default_rng(11)
    same = _scores(_batches(rng, 50, 1024, 64))
    shifted = _scores(_batches(rng, 50, 1024, 64, shift=1.0))
    wider = _scores(_batches(rng, 50, 1024, 64, scale=2.0))
    narrower = _scores(_batches(rng, 50, 1024, 64, scale=0.5))
    assert shifted.mean() == pytest.approx(1.0, abs=0.02)
    assert wider.mean() == pytest.approx(1.125, abs=0.03)
    assert narrower.mean() == pytest.approx(1.125, abs=0.03)
    assert min(shifted.min(), wider.min(), narrower.min()) > 100 * same.max()
