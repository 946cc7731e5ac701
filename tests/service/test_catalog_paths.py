"""Checkpoint paths in a catalog stay inside the catalog's folder: no absolute paths, no
``..``, no symlink that leads out."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch

from service.core.catalog import CatalogError, load_catalog, resolve_inside


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """tmp/catalog/ (the catalog's folder) beside tmp/outside/, each with a checkpoint."""
    state = torch.nn.BatchNorm1d(4).state_dict()
    for folder in ("catalog", "catalog/sub", "outside"):
        (tmp_path / folder).mkdir(exist_ok=True)
        safetensors.torch.save_file(state, tmp_path / folder / "bn.safetensors")
    catalog, outside = tmp_path / "catalog", tmp_path / "outside"
    (catalog / "link-out.safetensors").symlink_to(outside / "bn.safetensors")
    (catalog / "dir-out").symlink_to(outside, target_is_directory=True)
    (catalog / "link-in.safetensors").symlink_to(catalog / "sub" / "bn.safetensors")
    return catalog


@pytest.mark.parametrize("relative", [
    "bn.safetensors", "sub/bn.safetensors", "./sub/../bn.safetensors", "link-in.safetensors",
])
def test_paths_inside_the_folder_resolve(tree: Path, relative: str) -> None:
    path = resolve_inside(tree, relative)
    assert path.is_relative_to(tree.resolve())
    assert path.is_file()


@pytest.mark.parametrize(("relative", "message"), [
    ("../outside/bn.safetensors", "escapes"),
    ("sub/../../outside/bn.safetensors", "escapes"),
    ("..", "escapes"),
    ("link-out.safetensors", "escapes"),
    ("dir-out/bn.safetensors", "escapes"),
    ("/etc/passwd", "must be relative"),
    ("ABSOLUTE", "must be relative"),
])
def test_escapes_are_refused(tree: Path, relative: str, message: str) -> None:
    if relative == "ABSOLUTE":
        relative = str(tree.parent / "outside" / "bn.safetensors")
    with pytest.raises(ValueError, match=message):
        resolve_inside(tree, relative)


@pytest.mark.parametrize("relative", ["link-out.safetensors", "dir-out/bn.safetensors",
                                      "../outside/bn.safetensors"])
def test_a_catalog_pointing_outside_its_folder_does_not_load(tree: Path, relative: str) -> None:
    catalog = tree / "catalog.toml"
    catalog.write_text(f'[[layer]]\nname = "a"\nkind = "BatchNorm1d"\nnum_features = 4\n'
                       f'checkpoint = "{relative}"\n')
    with pytest.raises(CatalogError, match="escapes"):
        load_catalog(catalog)


def test_a_catalog_pointing_inside_through_a_symlink_loads(tree: Path) -> None:
    catalog = tree / "catalog.toml"
    catalog.write_text('[[layer]]\nname = "a"\nkind = "BatchNorm1d"\nnum_features = 4\n'
                       'checkpoint = "link-in.safetensors"\n')
    (spec,) = load_catalog(catalog)
    assert spec.checkpoint == (tree / "sub" / "bn.safetensors").resolve()
