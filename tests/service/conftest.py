"""Fixtures for the service tests: one real server process for the whole session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .server_process import ServerProcess

_SERVER_KEY = pytest.StashKey[ServerProcess]()


@pytest.fixture(scope="session")
def server_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """Base URL (``http://127.0.0.1:<port>``) of ``python -m service`` on a free port:
    default catalog and settings, except the CPU as its device (results compare with
    torch on the CPU); memory-only state, no token. Stopped at the end of the session."""
    with ServerProcess(env={"NORMCORE_DEVICE": "cpu"}) as server:
        request.session.stash[_SERVER_KEY] = server
        yield server.url


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    # A failing test that talked to the server shows what the server logged.
    report = yield
    server = item.session.stash.get(_SERVER_KEY, None)
    if report.failed and server is not None and "server_url" in item.fixturenames:
        report.sections.append(("normcore server log", server.log()))
    return report
