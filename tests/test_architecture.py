"""The layering the project depends on (docs/ARCHITECTURE.md): normcore is pure compute;
the web framework lives in service/http and the entry points, grpc in service/grpc;
transports call the engine, only the engine calls the store, the store and its change log
meet through one interface; only service/http/errors.py chooses status codes; no module
grows past 400 lines."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import normcore
import normcore.functional as F

ROOT = Path(__file__).resolve().parents[1]
SERVICE = ROOT / "service"
WEB = {"service", "fastapi", "starlette", "uvicorn", "httpx", "pydantic", "pydantic_settings",
       "prometheus_client", "orjson"}
FRAMEWORK = ("fastapi", "starlette", "uvicorn")
ENTRY_POINTS = {"service/__main__.py", "service/app.py", "service/cli.py"}
# The gRPC transport: the one place that imports grpc. It reaches service/http only for the
# error table, which loads the web framework with it (both run in the app's process).
GRPC = "service/grpc/"
# protobuf: the messages (wire/proto), their codec, and the gRPC transport.
PROTOBUF_USERS = ("service/wire/proto/", "service/wire/v2_grpc.py", GRPC)


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, relative imports resolved to absolute names."""
    package = _module(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names.add(module)
            names |= {f"{module}.{alias.name}" for alias in node.names}
    return names


def _service_modules() -> list[Path]:
    return sorted(SERVICE.rglob("*.py"))


def _top(names: set[str]) -> set[str]:
    return {n.split(".")[0] for n in names}


@pytest.mark.parametrize("path", sorted((ROOT / "normcore").rglob("*.py")), ids=_rel)
def test_normcore_imports_no_web_layer(path: Path) -> None:
    assert not _top(_imported_modules(path)) & WEB


def _outside_http() -> list[Path]:
    return [p for p in _service_modules()
            if not _rel(p).startswith("service/http/") and _rel(p) not in ENTRY_POINTS]


def _loaded_by(modules: list[str], watched: set[str]) -> dict[str, list[str]]:
    """Which of the ``watched`` top-level packages importing each module loads, each in a
    fresh state: an import chain (a journal that pulls in an error module that pulls in
    FastAPI) shows in sys.modules, not in the source."""
    watched = set(watched)
    script = (
        "import importlib, json, sys\n"
        f"found = {{}}\nfor name in {modules!r}:\n"
        "    for m in list(sys.modules):\n"
        f"        if m.split('.')[0] in {watched | {'service'}!r}:\n"
        "            del sys.modules[m]\n"
        "    importlib.import_module(name)\n"
        f"    found[name] = sorted({{m.split('.')[0] for m in sys.modules}} & {watched!r})\n"
        "print(json.dumps(found))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                         text=True, check=True, timeout=120).stdout
    return {name: found for name, found in json.loads(out).items() if found}


def test_the_web_framework_is_not_loaded_outside_http_even_indirectly() -> None:
    modules = [_module(p) for p in _outside_http() if not _rel(p).startswith(GRPC)]
    assert _loaded_by([*modules, "normcore"], set(FRAMEWORK)) == {}


def test_grpc_and_protobuf_are_loaded_only_where_they_are_used() -> None:
    # service.app starts the gRPC server, importing it only when a port is set.
    modules = [_module(p) for p in _service_modules() if not _rel(p).startswith(GRPC)]
    loaded = _loaded_by([*modules, "normcore"], {"grpc", "google"})
    allowed = {_module(p) for p in _service_modules() if _rel(p).startswith(PROTOBUF_USERS)}
    assert {name: found for name, found in loaded.items()
            if not (name in allowed and found == ["google"])} == {}


def test_only_the_grpc_transport_imports_grpc() -> None:
    users = {_rel(p) for p in _service_modules() if "grpc" in _top(_imported_modules(p))}
    assert users
    assert all(user.startswith(GRPC) for user in users), users


def test_only_the_tracing_module_imports_opentelemetry() -> None:
    # Imported there lazily, so nothing of it loads while tracing is off.
    users = {_rel(p) for p in _service_modules()
             if "opentelemetry" in _top(_imported_modules(p))}
    assert users == {"service/tracing.py"}


def test_the_grpc_transport_reaches_http_only_for_the_error_table() -> None:
    for path in (SERVICE / "grpc").rglob("*.py"):
        http = {m for m in _imported_modules(path) if m.startswith("service.http")}
        assert http <= {"service.http.errors", "service.http.errors.grpc_status_of"}, path


@pytest.mark.parametrize("path", _outside_http(), ids=_rel)
def test_the_web_framework_is_imported_only_in_http_and_the_entry_points(path: Path) -> None:
    assert not _top(_imported_modules(path)) & set(FRAMEWORK)


def _importers_of(prefix: str) -> set[str]:
    return {_rel(p) for p in _service_modules()
            if any(m == prefix or m.startswith(prefix + ".") for m in _imported_modules(p))}


def test_routes_reach_the_state_only_through_the_engine() -> None:
    for path in [*(SERVICE / "http").rglob("*.py"), *(SERVICE / "grpc").rglob("*.py")]:
        assert not {m for m in _imported_modules(path) if m.startswith("service.state")}, path
        attributes = {n.attr for n in ast.walk(ast.parse(path.read_text()))
                      if isinstance(n, ast.Attribute)}
        assert "store" not in attributes, f"{_rel(path)} reaches into the engine's store"


def test_only_the_engine_calls_the_store() -> None:
    users = _importers_of("service.state.store") - {"service/state/store.py"}
    assert users <= {"service/core/engine.py", "service/app.py"}


def test_store_and_change_log_meet_through_one_interface() -> None:
    persistence = _imported_modules(SERVICE / "state" / "persistence.py")
    store = _imported_modules(SERVICE / "state" / "store.py")
    assert not {m for m in persistence if m.startswith("service.state.store")}
    assert not {m for m in store if m.startswith("service.state.persistence")}
    # Connected in one place: the app's wiring (and adopt.py, which moves one process's
    # state into the workers' shared database before they start).
    assert _importers_of("service.state.persistence") == {"service/app.py",
                                                          "service/state/adopt.py"}


def test_the_shared_log_meets_the_store_through_the_same_interface() -> None:
    package = SERVICE / "state" / "shared"
    inside = {_rel(p) for p in package.glob("*.py")}
    imported = set().union(*(_imported_modules(p) for p in package.glob("*.py")))
    assert not {m for m in imported if m.startswith(("service.state.store",
                                                     "service.state.persistence"))}
    store = _imported_modules(SERVICE / "state" / "store.py")
    assert not {m for m in store if m.startswith("service.state.shared")}
    assert _importers_of("service.state.shared") - inside == {"service/app.py",
                                                              "service/state/adopt.py"}


def test_the_database_driver_is_imported_only_by_its_adapter() -> None:
    users = {_rel(p) for p in _service_modules() if "psycopg" in _top(_imported_modules(p))}
    assert users == {"service/state/shared/postgres.py"}


def test_lower_layers_do_not_reach_up() -> None:
    for path in _service_modules():
        name, imported = _rel(path), _imported_modules(path)
        up = set()
        if name.startswith(("service/state/", "service/core/", "service/wire/")):
            up |= {m for m in imported if m.startswith(("service.http", "service.grpc"))}
        if name.startswith("service/state/"):
            up |= {m for m in imported if m.startswith(
                ("service.wire", "service.core.engine", "service.core.batching"))}
        if name.startswith("service/core/"):
            up |= {m for m in imported if m.startswith("service.wire")}
        assert not up, f"{name} imports {sorted(up)}"


def _status_literals(path: Path) -> list[int]:
    """HTTP error statuses given to a call (a reply or an exception), apart from OpenAPI
    ``errors(...)`` declarations, which document rather than decide."""
    source = path.read_text()
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call) or getattr(node.func, "id", "") == "errors":
            continue
        values = [*node.args, *(k.value for k in node.keywords
                                if k.arg in ("status", "status_code"))]
        found += [v.value for v in values if isinstance(v, ast.Constant)
                  and type(v.value) is int and 400 <= v.value < 600
                  and not ast.get_source_segment(source, v).startswith("0o")]
    return found


@pytest.mark.parametrize("path", _service_modules(), ids=_rel)
def test_only_the_error_table_chooses_status_codes(path: Path) -> None:
    # The protocol guard answers malformed or slow HTTP itself, before there is a request;
    # the client reads statuses, it does not choose them.
    if _rel(path) in ("service/http/errors.py", "service/http/protocol.py",
                      "service/client.py"):
        return
    assert _status_literals(path) == []


def test_the_status_check_sees_status_codes() -> None:
    # The check above must be able to fail.
    assert _status_literals(SERVICE / "http" / "errors.py")


SOURCES = sorted(p for folder in ("normcore", "service", "bench", "tests", "scripts")
                 for p in (ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=_rel)
def test_no_module_passes_400_lines(path: Path) -> None:
    assert len(path.read_text().splitlines()) <= 400


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
