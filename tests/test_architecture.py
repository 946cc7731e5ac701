"""The layering the project depends on: normcore is pure compute, the engine knows no HTTP,
and the public names are the ones exported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import normcore

ROOT = Path(__file__).resolve().parents[1]
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


@pytest.mark.parametrize("path", sorted((ROOT / "normcore").rglob("*.py")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_normcore_imports_no_web_layer(path: Path) -> None:
    assert not _imports(path) & WEB


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
