"""ServerProcess: the real server (``python -m service``) in a child process, for tests that
kill it, restart it, or load it from many clients.

It binds port 0 on 127.0.0.1 (no race for a free port) and learns the port from uvicorn's
start-up line in its log file, which also explains any failure.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
_LISTENING = re.compile(r"running on http://127\.0\.0\.1:(\d+)")


class ServerError(RuntimeError):
    """The server did not start (the message holds the end of its log)."""


class ServerProcess:
    """``python -m service --host 127.0.0.1 --port 0 *args``, logging to ``log``."""

    def __init__(self, *args: str, log: Path, env: dict[str, str] | None = None) -> None:
        self.args = list(args)
        self.log = log
        self.env = env or {}
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> ServerProcess:
        """Start and wait until /readyz answers 200."""
        env = {**os.environ, "PYTHONPATH": str(ROOT), "NORMCORE_THREADS": "1", **self.env}
        offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", "0",
                 "--log-level", "info", *self.args],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        self.port = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            if self.port is None:
                found = _LISTENING.search(self.log.read_bytes()[offset:].decode(errors="replace"))
                self.port = int(found.group(1)) if found else None
            elif self._ready():
                return self
            time.sleep(0.05)
        self.kill()
        raise ServerError(f"server not ready after {timeout} s:\n{self.tail()}")

    def _ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/readyz", timeout=2.0).status_code == 200
        except httpx.TransportError:
            return False

    def wait_exit(self, timeout: float = 30.0) -> int:
        """Wait for the process to exit on its own; its exit status."""
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind runs in the server."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (a graceful stop); the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()
