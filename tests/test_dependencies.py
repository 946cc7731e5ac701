"""Dependencies: what the code imports is declared in pyproject.toml, and the packages whose
private parts are subclassed are installed within the bounds they were checked against."""

from __future__ import annotations

import ast
import asyncio
import importlib.metadata
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
REQUIREMENTS = {canonicalize_name(r.name): r for r in map(
    Requirement, PYPROJECT["project"]["dependencies"])}
LOCAL = {"normcore", "service"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _third_party_imports() -> dict[str, set[str]]:
    """Top-level module -> the files that import it, for every non-stdlib import."""
    found: dict[str, set[str]] = {}
    for folder in LOCAL:
        for path in (ROOT / folder).rglob("*.py"):
            for name in _imports(path) - set(sys.stdlib_module_names) - LOCAL:
                found.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_imported_package_is_declared() -> None:
    distributions = importlib.metadata.packages_distributions()
    missing = {}
    for module, files in _third_party_imports().items():
        names = {canonicalize_name(d) for d in distributions.get(module, [module])}
        if not names & set(REQUIREMENTS):
            missing[module] = sorted(files)
    assert missing == {}, "imported but not in [project] dependencies of pyproject.toml"


def _bounded() -> list[Requirement]:
    return [r for r in REQUIREMENTS.values()
            if any(spec.operator in ("<", "<=", "==", "~=") for spec in r.specifier)]


def test_uvicorn_is_bounded() -> None:
    assert "uvicorn" in {canonicalize_name(r.name) for r in _bounded()}


@pytest.mark.parametrize("requirement", _bounded(), ids=lambda r: r.name)
def test_bounded_packages_are_installed_within_their_bounds(requirement: Requirement) -> None:
    installed = importlib.metadata.version(requirement.name)
    assert requirement.specifier.contains(installed, prereleases=True), (
        f"{requirement.name} {installed} is installed, outside {requirement.specifier} in "
        f"pyproject.toml: the code uses private parts of it (see the comment there). Check "
        f"them against {installed} (tests/service/test_connection_guards.py), then move the "
        f"bound.")


def test_uvicorns_private_parts_that_the_protocol_uses_are_there() -> None:
    # What service/http/protocol.py reads and overrides; a release that renames any of them
    # would break the slow-client guard without an import error.
    import uvicorn
    from uvicorn.protocols.http import httptools_impl
    from uvicorn.server import ServerState

    from service.http.protocol import GuardedHttpToolsProtocol

    for status in (400, 408, 431):
        assert status in httptools_impl.STATUS_LINE
    for method in ("connection_made", "connection_lost", "on_message_begin",
                   "on_message_complete", "on_url", "on_header", "send_400_response"):
        assert callable(getattr(httptools_impl.HttpToolsProtocol, method, None)), method

    async def app(scope, receive, send):  # pragma: no cover - never called
        raise AssertionError

    class Transport(asyncio.Transport):
        def get_extra_info(self, name, default=None):
            return {"peername": ("127.0.0.1", 5000), "sockname": ("127.0.0.1", 8000)}.get(
                name, default)

        def is_closing(self) -> bool:
            return False

        def close(self) -> None:
            pass

    config = uvicorn.Config(app, log_config=None)
    config.load()
    loop = asyncio.new_event_loop()
    try:
        protocol = GuardedHttpToolsProtocol(config, ServerState(), {}, loop)
        protocol.connection_made(Transport())
        assert protocol.cycle is None
        assert protocol.client == ("127.0.0.1", 5000)
        assert protocol.loop is loop
        assert isinstance(protocol.server_state.default_headers, list)
        protocol.connection_lost(None)
    finally:
        loop.close()
