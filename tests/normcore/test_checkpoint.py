"""Checkpoints: real torch.nn models saved both ways, unsafe and damaged files refused."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

import normcore
from normcore.checkpoint import (
    find_norm_layers,
    layer_state_bytes,
    load_layer_state,
    load_state_dict,
    load_state_dict_bytes,
    modules_state_bytes,
    save_layer_state,
)
from normcore.errors import CheckpointError


def _trained_convnet() -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3), nn.BatchNorm2d(16, momentum=None), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 10), nn.BatchNorm1d(10),
    )
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(6, 3, 8, 8) * 2 + 1)
    return model.eval()


@pytest.fixture
def convnet() -> nn.Module:
    return _trained_convnet()


@pytest.fixture(params=["torch", "safetensors"])
def saved(request, convnet, tmp_path: Path) -> Path:
    if request.param == "torch":
        path = tmp_path / "model.pt"
        torch.save(convnet.state_dict(), path)
    else:
        path = tmp_path / "model.safetensors"
        safetensors.torch.save_file(convnet.state_dict(), path)
    return path


def test_every_batch_norm_layer_is_found_and_loads_equal(convnet, saved: Path) -> None:
    state = load_state_dict(saved)
    found = find_norm_layers(state)
    assert [(f.path, f.num_features) for f in found] == [("1", 8), ("4", 16), ("8", 10)]
    x_by_path = {"1": torch.randn(2, 8, 6, 6), "4": torch.randn(2, 16, 4, 4),
                 "8": torch.randn(5, 10)}
    for f in found:
        reference = convnet.get_submodule(f.path)
        ours = getattr(normcore, type(reference).__name__)(f.num_features).eval()
        load_layer_state(ours, state, f.prefix, source=str(saved))
        for key, value in reference.state_dict().items():
            assert torch.equal(ours.state_dict()[key], value), key
        x = x_by_path[f.path]
        torch.testing.assert_close(ours(x), reference(x))


def test_nested_training_checkpoint_is_unwrapped(convnet, tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "state_dict": convnet.state_dict()}, path)
    assert len(find_norm_layers(load_state_dict(path))) == 3


class _Exploit:
    def __reduce__(self):
        import os

        return (os.system, (f"touch {_Exploit.marker}",))


def test_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    _Exploit.marker = marker
    path = tmp_path / "evil.pt"
    torch.save({"running_mean": torch.zeros(3), "payload": _Exploit()}, path)
    with pytest.raises(CheckpointError, match=r"evil\.pt.*refused"):
        load_state_dict(path)
    assert not marker.exists()
    # The same bytes as a plain pickle file are refused as well.
    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps(_Exploit()))
    with pytest.raises(CheckpointError, match=r"evil\.pkl"):
        load_state_dict(raw)
    assert not marker.exists()


def test_truncated_safetensors_is_refused_with_a_clear_message(convnet, tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(convnet.state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a valid safetensors"):
        load_state_dict(path)


def test_truncated_torch_file_and_missing_file_are_refused(convnet, tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(convnet.state_dict(), path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=r"model\.pt: cannot be read"):
        load_state_dict(path)
    with pytest.raises(CheckpointError, match="no such file"):
        load_state_dict(tmp_path / "absent.safetensors")


def _bn_state(**overrides: torch.Tensor) -> dict[str, torch.Tensor]:
    state = dict(nn.BatchNorm1d(4).state_dict())
    state.update(overrides)
    return state


def _adapted_layer() -> normcore.BatchNorm1d:
    """A layer whose every tensor differs from a fresh one's (and so from _bn_state's), so
    that a half-loaded state would show."""
    layer = normcore.BatchNorm1d(4)
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
        layer(torch.randn(8, 4) * 2 + 1)
    return layer


@pytest.mark.parametrize(
    ("state", "message"),
    [
        (_bn_state(running_var=torch.tensor([1.0, -0.5, 1.0, 1.0])), "negative"),
        (_bn_state(running_mean=torch.tensor([0.0, float("nan"), 0.0, 0.0])), "NaN or Inf"),
        (_bn_state(weight=torch.tensor([1.0, float("inf"), 1.0, 1.0])), "NaN or Inf"),
        (_bn_state(running_mean=torch.zeros(5)), "shape"),
        (_bn_state(running_mean=torch.zeros(4, dtype=torch.int32)), "dtype"),
        (_bn_state(num_batches_tracked=torch.tensor(2.5)), "dtype"),
        (_bn_state(num_batches_tracked=torch.tensor(-1)), "negative"),
        ({k: v for k, v in _bn_state().items() if k != "running_var"}, "missing key"),
    ],
    ids=["negative-var", "nan-mean", "inf-weight", "shape", "int-mean", "float-count",
         "negative-count", "missing"],
)
def test_invalid_values_are_refused_and_layer_is_untouched(state, message) -> None:
    layer = _adapted_layer()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(CheckpointError, match=message):
        load_layer_state(layer, state, source="bn.safetensors")
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_missing_num_batches_tracked_starts_at_zero() -> None:
    state = {k: v for k, v in _bn_state().items() if k != "num_batches_tracked"}
    layer = normcore.BatchNorm1d(4)
    layer(torch.randn(8, 4))
    load_layer_state(layer, state)
    assert int(layer.num_batches_tracked) == 0


def test_saved_state_goes_back_into_a_torch_model(tmp_path: Path) -> None:
    layer = normcore.BatchNorm2d(8, momentum=None)
    with torch.no_grad():
        for _ in range(3):
            layer(torch.randn(4, 8, 3, 3) + 2)
    path = tmp_path / "adapted.safetensors"
    save_layer_state(layer, path)
    model = _trained_convnet()
    model[1].load_state_dict(safetensors.torch.load_file(path))
    for key, value in layer.state_dict().items():
        assert torch.equal(model[1].state_dict()[key], value)
    assert load_state_dict_bytes(layer_state_bytes(layer)).keys() == layer.state_dict().keys()


def test_modules_state_is_the_models_own_state_dict_for_those_modules(convnet) -> None:
    fresh = _trained_convnet()  # other running statistics, the same keys
    state = load_state_dict_bytes(modules_state_bytes({"1": convnet[1], "8": convnet[8]}))
    own = convnet.state_dict()
    assert set(state) == {k for k in own if k.startswith(("1.", "8."))}
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    assert unexpected == []
    assert not [k for k in missing if k.startswith(("1.", "8."))]
    for key in state:
        assert torch.equal(fresh.state_dict()[key], own[key]), key


def test_upload_bytes_must_be_safetensors(convnet, tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(convnet.state_dict(), path)
    with pytest.raises(CheckpointError, match="upload: not a valid safetensors"):
        load_state_dict_bytes(path.read_bytes())
