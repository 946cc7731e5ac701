"""Fixtures for the service tests: the app in-process, and one real server process."""

from __future__ import annotations

import os
from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient

from normcore import kernels
from service.app import create_app
from service.settings import Settings
from tests.server_process import ServerProcess, service_process

from .postgres import Cluster, bindir

_SERVER_KEY = pytest.StashKey[ServerProcess]()


@pytest.fixture(scope="session", autouse=True)
def _kernels_built() -> None:
    """The fused kernels built once, here, before any server process starts: on a fresh
    machine each would otherwise compile them (most of a minute on a busy 2-core box) inside
    its ready timeout. Later processes load the cached build."""
    kernels.warm_up()


def make_client(**settings) -> TestClient:
    settings.setdefault("threads", 1)
    settings.setdefault("device", "cpu")
    return TestClient(create_app(Settings(**settings)), raise_server_exceptions=False)


@pytest.fixture
def client() -> Iterator[TestClient]:
    """The app in-process, default catalog, fresh state for each test."""
    with make_client() as c:
        yield c


@pytest.fixture(scope="session")
def postgres() -> Iterator[Cluster]:
    """A PostgreSQL server of its own for the session (initdb into a temporary folder, a
    free port of 127.0.0.1, trust auth), stopped and deleted at the end. Skipped where
    PostgreSQL is not installed, except in CI, which installs it (.ci/run)."""
    if bindir() is None and not os.environ.get("CI"):
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    cluster = Cluster.create()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def state_url(postgres: Cluster) -> str:
    """A fresh, empty database on the session's PostgreSQL server."""
    return postgres.new_database()


@pytest.fixture(scope="session")
def server(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    """``python -m service`` on a free port for the whole session: default catalog and
    settings, except the CPU as its device (results compare with torch on the CPU);
    memory-only state, no token."""
    with service_process(env={"NORMCORE_DEVICE": "cpu"}) as proc:
        request.session.stash[_SERVER_KEY] = proc
        yield proc


@pytest.fixture(scope="session")
def server_url(server: ServerProcess) -> str:
    return server.url


@pytest.fixture(scope="module")
def v2_client(server_url: str):
    """tritonclient's HTTP client on the session's server, closed after the module (an
    unclosed one leaves a socket for the garbage collector: a ResourceWarning, an error)."""
    from .v2_helpers import triton_client

    client = triton_client(server_url)
    yield client
    client.close()


@pytest.fixture(scope="module")
def http(server_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server_url, trust_env=False, timeout=60) as client:
        yield client


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    # A failing test that talked to the server shows what the server logged.
    report = yield
    proc = item.session.stash.get(_SERVER_KEY, None)
    if report.failed and proc is not None and {"server", "server_url"} & set(item.fixturenames):
        report.sections.append(("normcore server log", proc.log()))
    return report
