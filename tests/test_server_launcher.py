"""The launcher of real server processes (tests/server_process.py), on a stdlib HTTP server."""

from __future__ import annotations

import gc
import signal
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.server_process import ServerError, ServerProcess


def _static_server(folder: Path, **options) -> ServerProcess:
    cmd = [sys.executable, "-m", "http.server", "{port}", "--bind", "127.0.0.1",
           "--directory", str(folder)]
    return ServerProcess(cmd, ready="/", log=folder / "server.log", **options)


def test_a_free_port_fills_the_command_and_sigterm_stops_the_server(tmp_path: Path) -> None:
    (tmp_path / "hello.txt").write_text("hello")
    server = _static_server(tmp_path)
    with server:
        assert str(server.port) in server.cmd
        with urllib.request.urlopen(f"{server.url}/hello.txt", timeout=5) as reply:
            assert reply.read() == b"hello"
        assert server.stop() == -signal.SIGTERM
        assert not server.alive()
    assert "GET /hello.txt" in server.log()


def test_a_server_that_exits_at_start_fails_with_its_log_tail(tmp_path: Path) -> None:
    server = ServerProcess([sys.executable, "-c", "print('no catalog'); raise SystemExit(3)",
                            "{port}"], log=tmp_path / "server.log")
    with pytest.raises(ServerError, match="exited with 3") as error:
        server.start()
    assert "no catalog" in str(error.value)


def test_a_server_never_ready_is_killed_and_fails_with_its_log_tail(tmp_path: Path) -> None:
    server = _static_server(tmp_path, ready_timeout=1.0)
    server.ready = "/missing"  # http.server answers 404
    with pytest.raises(ServerError, match="not ready after 1 s") as error:
        server.start()
    assert "GET /missing" in str(error.value)
    assert not server.alive()


def test_its_own_folder_and_log_go_with_it_unless_it_never_became_ready() -> None:
    # cwd=None and no log: both are made in the temp folder, and removed when the object
    # goes, so a test run does not fill the temp folder; a failed start keeps the log its
    # error names.
    cmd = [sys.executable, "-m", "http.server", "{port}", "--bind", "127.0.0.1"]
    server = ServerProcess(cmd, ready="/", cwd=None)
    with server:
        folder, log = server.cwd, server.log_path
        assert folder.is_dir()
        assert not any(folder.iterdir())  # it serves that folder
    assert "GET / " in server.log()
    del server
    gc.collect()
    assert not folder.exists()
    assert not log.exists()

    failing = ServerProcess([sys.executable, "-c", "raise SystemExit(3)", "{port}"], cwd=None)
    with pytest.raises(ServerError, match="exited with 3"):
        failing.start()
    folder, log = failing.cwd, failing.log_path
    del failing
    gc.collect()
    assert not folder.exists()
    assert log.exists()
    log.unlink()


def test_a_command_without_a_port_is_refused() -> None:
    with pytest.raises(ValueError, match="port is unknown"):
        ServerProcess([sys.executable, "-m", "http.server"])


def test_the_environment_drops_normcore_settings_and_fills_the_port(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NORMCORE_API_TOKEN", "from-the-shell")
    server = ServerProcess(["server"], env={"NORMCORE_PORT": "{port}"}, port=8123)
    assert "NORMCORE_API_TOKEN" not in server.env
    assert server.env["NORMCORE_PORT"] == "8123"
    assert server.url == "http://127.0.0.1:8123"
