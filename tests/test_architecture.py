"""The layering the project depends on: normcore is pure compute, the engine knows no HTTP,
and the public names are the ones exported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import normcore
import normcore.functional as F

ROOT = Path(__file__).resolve().parents[1]
NORMCORE_FILES = sorted((ROOT / "normcore").rglob("*.py"))
WEB = {"service", "fastapi", "starlette", "uvicorn", "httpx", "pydantic", "pydantic_settings",
       "prometheus_client", "orjson"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", NORMCORE_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_normcore_imports_no_web_layer(path: Path) -> None:
    assert not _imports(path) & WEB


def test_normcore_modules_are_split_before_400_lines() -> None:
    lines = {p.relative_to(ROOT): len(p.read_text().splitlines()) for p in NORMCORE_FILES}
    assert {p: n for p, n in lines.items() if n > 400} == {}


@pytest.mark.parametrize("module", ["engine.py", "store.py", "catalog.py", "persistence.py",
                                    "journal.py", "snapshot.py", "records.py", "idempotency.py"])
def test_service_core_imports_no_http(module: str) -> None:
    assert not _imports(ROOT / "service" / module) & {"fastapi", "starlette", "uvicorn"}


def test_normcore_exports_sorted_public_names() -> None:
    assert normcore.__all__ == sorted(normcore.__all__)
    for name in normcore.__all__:
        assert hasattr(normcore, name), name
    public = {n for n in dir(normcore) if not n.startswith("_")}
    modules = {"batch_norm", "errors", "group_norm", "instance_norm", "layer_norm"}
    assert public - modules - {"annotations"} == set(normcore.__all__)


def test_functional_exports_torch_compatible_names_and_nothing_else() -> None:
    assert F.__all__ == [
        "Normalized", "RMSNormalized", "batch_norm", "batch_norm_stats",
        "batch_norm_with_stats", "group_norm", "group_norm_with_stats", "instance_norm",
        "instance_norm_with_stats", "layer_norm", "layer_norm_with_stats", "rms_norm",
        "rms_norm_with_stats",
    ]
    public = {n for n in dir(F) if not n.startswith("_")}
    assert public - {"annotations"} == set(F.__all__)
