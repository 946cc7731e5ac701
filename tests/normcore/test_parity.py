"""normcore layers against torch.nn on the same inputs: outputs, running statistics,
state dicts both ways, and the statistics that ``normalize`` returns against float64."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import DEVICES

from .cases import CASES, Case

pytestmark = pytest.mark.usefixtures("both_paths")

ATOL = 1e-5


def _randomize(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if name.endswith("running_var"):
                tensor.copy_(torch.rand_like(tensor) + 0.5)
            elif name.endswith("num_batches_tracked"):
                tensor.fill_(3)
            elif tensor.is_floating_point():
                tensor.copy_(torch.randn_like(tensor))


def _assert_same_state(ours: torch.nn.Module, ref: torch.nn.Module) -> None:
    ours_state, ref_state = ours.state_dict(), ref.state_dict()
    assert ours_state.keys() == ref_state.keys()
    for key, value in ref_state.items():
        torch.testing.assert_close(ours_state[key], value, atol=ATOL, rtol=1e-5, msg=key)


def _pair(case: Case, device: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    ours, ref = case.build()
    _randomize(ref)
    ours.load_state_dict(ref.state_dict())
    return ours.to(device), ref.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_train_steps_then_eval_match_torch(case: Case, device: str) -> None:
    ours, ref = _pair(case, device)
    with torch.no_grad():
        for _ in range(3):
            for shape in case.shapes:
                x = torch.randn(shape, device=device) * 2 + 0.5
                torch.testing.assert_close(ours.train()(x), ref.train()(x), atol=ATOL, rtol=0)
                _assert_same_state(ours, ref)
        for shape in case.shapes:
            x = torch.randn(shape, device=device) * 2 - 0.5
            torch.testing.assert_close(ours.eval()(x), ref.eval()(x), atol=ATOL, rtol=0)
    _assert_same_state(ours, ref)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_state_dict_loads_both_ways(case: Case) -> None:
    ours, ref = case.build()
    _randomize(ref)
    ours.load_state_dict(ref.state_dict())
    back, _ = case.build()
    _, fresh_ref = case.build()
    fresh_ref.load_state_dict(ours.state_dict())
    back.load_state_dict(fresh_ref.state_dict())
    _assert_same_state(back, ref)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in ref.named_buffers()]


def _reference_stats(case: Case, layer: torch.nn.Module, x: torch.Tensor) -> dict:
    x64 = x.double()
    kind = case.kind
    if kind.startswith("BatchNorm"):
        var, mean = torch.var_mean(x64, dim=[0, *range(2, x.dim())], correction=0)
    elif kind.startswith("InstanceNorm"):
        unbatched = x.dim() == int(kind[-2]) + 1
        xb = x64.unsqueeze(0) if unbatched else x64
        var, mean = torch.var_mean(xb, dim=list(range(2, xb.dim())), correction=0)
        if unbatched:
            var, mean = var[0], mean[0]
    elif kind == "GroupNorm":
        var, mean = torch.var_mean(x64.reshape(x.size(0), layer.num_groups, -1), dim=2,
                                   correction=0)
    else:
        dims = list(range(x.dim() - len(layer.normalized_shape), x.dim()))
        if kind == "RMSNorm":
            return {"mean_square": x64.pow(2).mean(dims)}
        var, mean = torch.var_mean(x64, dim=dims, correction=0)
    return {"mean": mean, "var": var}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_normalize_returns_output_and_batch_statistics(case: Case, device: str) -> None:
    ours, ref = _pair(case, device)
    for mode in ("train", "eval"):
        ours.train(mode == "train")
        ref.train(mode == "train")
        for shape in case.shapes:
            x = torch.randn(shape, device=device) * 3 + 1
            with torch.no_grad():
                result = ours.normalize(x)
                expected = ref(x)
            torch.testing.assert_close(result.output, expected, atol=ATOL, rtol=0)
            for name, value in _reference_stats(case, ours, x).items():
                got = getattr(result, name)
                assert got.dtype == torch.float32
                torch.testing.assert_close(got.double(), value, atol=1e-5, rtol=1e-5, msg=name)
            _assert_same_state(ours, ref)


@pytest.mark.parametrize("case", [c for c in CASES if "Norm" in c.kind], ids=lambda c: c.id)
def test_train_override_matches_train_mode_without_switching_the_layer(case: Case) -> None:
    ours, ref = _pair(case, "cpu")
    ours.eval()
    ref.train()
    with torch.no_grad():
        for shape in case.shapes:
            x = torch.randn(shape)
            torch.testing.assert_close(ours.normalize(x, train=True).output, ref(x), atol=ATOL,
                                       rtol=0)
            _assert_same_state(ours, ref)
    assert not ours.training
