"""The TOML catalog: the built-in one, whole-model entries, and every way to get it wrong."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

from service.core.catalog import CatalogError, default_catalog, load_catalog, models_of

ROOT = Path(__file__).resolve().parents[2]


def test_default_catalog_serves_the_trained_digits_statistics() -> None:
    specs = {s.name: s for s in load_catalog()}
    state = safetensors.torch.load_file(default_catalog().parent / "digits_cnn.safetensors")
    for name, prefix, kind in [("digits.bn1", "features.1.", "BatchNorm2d"),
                               ("digits.head.bn", "head.2.", "BatchNorm1d")]:
        layer = specs[name].build(torch.device("cpu"))
        assert type(layer).__name__ == kind
        for key, value in layer.state_dict().items():
            assert torch.equal(value, state[prefix + key]), key
        # Real training leaves real statistics behind, not torch's defaults.
        assert int(layer.num_batches_tracked) > 0
        assert not torch.allclose(layer.running_var, torch.ones_like(layer.running_var))
    assert specs["stream.bn"].build(torch.device("cpu")).momentum is None


def test_default_catalog_names_the_digits_model_by_module_path() -> None:
    assert models_of(load_catalog()) == {"digits.": {
        "features.1": "digits.bn1", "features.4": "digits.bn2", "features.8": "digits.bn3",
        "head.2": "digits.head.bn"}}


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "catalog.toml"
    path.write_text(text)
    return path


def _resnetish() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Sequential(nn.Conv2d(4, 8, 3), nn.BatchNorm2d(8)),
    )


def test_model_entry_serves_every_batch_norm_of_a_checkpoint(tmp_path: Path) -> None:
    model = _resnetish()
    with torch.no_grad():
        model.train()(torch.randn(4, 3, 9, 9))
    torch.save(model.state_dict(), tmp_path / "net.pt")
    path = _write(tmp_path, '[[model]]\ncheckpoint = "net.pt"\nname_prefix = "net."\n'
                            'momentum = "cumulative"\n')
    specs = {s.name: s for s in load_catalog(path)}
    assert set(specs) == {"net.1", "net.3.1"}
    assert models_of(list(specs.values())) == {"net.": {"1": "net.1", "3.1": "net.3.1"}}
    layer = specs["net.3.1"].build(torch.device("cpu"))
    assert layer.momentum is None
    assert torch.equal(layer.running_mean, model[3][1].running_mean)


def test_layer_entry_accepts_the_documented_form(tmp_path: Path) -> None:
    bn = nn.BatchNorm2d(64)
    safetensors.torch.save_file({f"layer1.0.bn1.{k}": v for k, v in bn.state_dict().items()},
                                tmp_path / "resnet.safetensors")
    path = _write(tmp_path, """
[[layer]]
name = "stem.bn"
kind = "BatchNorm2d"
num_features = 64
eps = 1e-5
momentum = 0.1
checkpoint = "resnet.safetensors"
prefix = "layer1.0.bn1."
device = "cpu"
""")
    (spec,) = load_catalog(path)
    assert (spec.name, spec.kind, spec.device) == ("stem.bn", "BatchNorm2d", "cpu")


class _Exploit:
    def __reduce__(self):
        return (print, ("pwned",))


BAD = {
    "bad TOML": ("[[layer]\nname=", "not valid TOML"),
    "unknown kind": ('[[layer]]\nname = "a"\nkind = "Dropout"\n', "unknown kind 'Dropout'"),
    "unknown key": ('[[layer]]\nname = "a"\nkind = "LayerNorm"\nnormalized_shape = [4]\n'
                    'colour = "red"\n', "unknown argument(s) for LayerNorm: colour"),
    "missing checkpoint": ('[[layer]]\nname = "a"\nkind = "BatchNorm1d"\nnum_features = 4\n'
                           'checkpoint = "absent.safetensors"\n', "no such file"),
    "path escape": ('[[layer]]\nname = "a"\nkind = "BatchNorm1d"\nnum_features = 4\n'
                    'checkpoint = "../elsewhere.safetensors"\n', "escapes"),
    "absolute path": ('[[layer]]\nname = "a"\nkind = "BatchNorm1d"\nnum_features = 4\n'
                      'checkpoint = "/etc/passwd"\n', "must be relative"),
    "shape mismatch": ('[[layer]]\nname = "a"\nkind = "BatchNorm1d"\nnum_features = 5\n'
                       'checkpoint = "bn4.safetensors"\n', "has shape [4], expected [5]"),
    "unsafe checkpoint": ('[[layer]]\nname = "a"\nkind = "BatchNorm1d"\nnum_features = 4\n'
                          'checkpoint = "evil.pt"\n', "refused"),
    "bad name": ('[[layer]]\nname = "a b"\nkind = "LayerNorm"\nnormalized_shape = [4]\n',
                 "name must match"),
    "duplicate": ('[[layer]]\nname = "a"\nkind = "LayerNorm"\nnormalized_shape = [4]\n'
                  '[[layer]]\nname = "a"\nkind = "RMSNorm"\nnormalized_shape = [4]\n',
                  "used twice"),
    "unknown table": ('[[layers]]\nname = "a"\n', "unknown table(s) layers"),
    "model key": ('[[model]]\ncheckpoint = "bn4.safetensors"\nlayers = 3\n', "unknown key(s)"),
    "model of an unknown layer": ('[[model]]\nname_prefix = "m."\n[model.layers]\n'
                                  '"head.0" = "absent"\n', "no [[layer]] named 'absent'"),
    "model module path": ('[[layer]]\nname = "a"\nkind = "LayerNorm"\nnormalized_shape = [4]\n'
                          '[[model]]\nname_prefix = "m."\nlayers = {"x..0" = "a"}\n',
                          "is not a module path"),
    "layer in two models": ('[[layer]]\nname = "a"\nkind = "LayerNorm"\nnormalized_shape = [4]\n'
                            '[[model]]\nname_prefix = "m."\nlayers = {"x" = "a"}\n'
                            '[[model]]\nname_prefix = "n."\nlayers = {"y" = "a"}\n',
                            "already serves module 'x' of model 'm.'"),
    "model without a prefix": ('[[layer]]\nname = "a"\nkind = "LayerNorm"\n'
                               'normalized_shape = [4]\n[[model]]\nlayers = {"x" = "a"}\n',
                               "name_prefix must match"),
    "bad momentum": ('[[layer]]\nname = "a"\nkind = "BatchNorm1d"\nnum_features = 4\n'
                     'momentum = "fast"\n', "invalid arguments"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_catalog_is_one_clear_error_naming_file_and_entry(tmp_path: Path, case: str) -> None:
    safetensors.torch.save_file(nn.BatchNorm1d(4).state_dict(), tmp_path / "bn4.safetensors")
    torch.save({"x": _Exploit()}, tmp_path / "evil.pt")
    text, message = BAD[case]
    path = _write(tmp_path, text)
    with pytest.raises(CatalogError) as error:
        load_catalog(path)
    assert str(path) in str(error.value)
    assert message in str(error.value)


def test_server_refuses_to_start_on_a_bad_catalog(tmp_path: Path) -> None:
    path = _write(tmp_path, '[[layer]]\nname = "a"\nkind = "Dropout"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "service", "--catalog", str(path), "--port", "0"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
        text=True, timeout=60,
    )
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert str(path) in lines[0]
    assert "[[layer]] #1 (a)" in lines[0]
    assert "unknown kind" in lines[0]
