from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings

from .server_process import ServerProcess


def make_client(**settings) -> TestClient:
    settings.setdefault("threads", 1)
    return TestClient(create_app(Settings(**settings)), raise_server_exceptions=False)


@pytest.fixture
def client() -> Iterator[TestClient]:
    """The app in-process, default catalog, fresh state for each test."""
    with make_client() as c:
        yield c


@pytest.fixture(scope="session")
def server() -> Iterator[ServerProcess]:
    """One real server process (default catalog, memory state) shared by a session."""
    with ServerProcess() as proc:
        yield proc
