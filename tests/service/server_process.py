"""A real ``python -m service`` process, for end-to-end tests that drive, kill or restart it.

    with ServerProcess(["--state-dir", str(tmp)], env={"NORMCORE_API_TOKEN": "t"}) as server:
        httpx.get(server.url + "/readyz")

Unless ``args`` name a port, it binds port 0 (no race for a free port) and learns the port
from uvicorn's start-up line in its log file, which also explains any failure. The
environment is the caller's minus every ``NORMCORE_*`` variable, plus ``env``, so a
developer's settings never leak into a test. ``start()`` may be called again after a stop
or a kill: the same log file grows.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
_LISTENING = re.compile(r"running on http://[^:\s]+:(\d+)")


class ServerProcess:
    """``python -m service *args`` with ``env`` on top of a NORMCORE_-free environment."""

    def __init__(self, args: list[str] | None = None, env: dict[str, str] | None = None, *,
                 log: Path | None = None, ready_timeout: float = 60.0) -> None:
        self.args = list(args or [])
        if "--port" not in self.args:
            self.args += ["--port", "0"]
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("NORMCORE_")}
        self.env.update(env or {})
        self.env["PYTHONUNBUFFERED"] = "1"  # the log is complete when a test fails
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT),
                                                               self.env.get("PYTHONPATH")]))
        self.ready_timeout = ready_timeout
        if log is None:
            fd, path = tempfile.mkstemp(prefix="normcore-server-", suffix=".log")
            os.close(fd)
            log = Path(path)
        self.log_path = log
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait_ready: bool = True) -> ServerProcess:
        """Start the process; by default wait until ``/readyz`` answers 200."""
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as out:  # the child keeps its own handle
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "service", *self.args], cwd=ROOT, env=self.env,
                stdout=out, stderr=subprocess.STDOUT,
            )
        self.port = None
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}\n{self.tail()}")
            if self.port is None:
                text = self.log_path.read_bytes()[offset:].decode(errors="replace")
                found = _LISTENING.search(text)
                self.port = int(found.group(1)) if found else None
            elif not wait_ready or self._ready():
                return self
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"server not ready after {self.ready_timeout} s\n{self.tail()}")

    def _ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/readyz", timeout=2.0, trust_env=False).status_code \
                == 200
        except httpx.TransportError:
            return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        """Wait for the process to exit on its own; its exit status."""
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind runs in the server."""
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (a graceful stop), SIGKILL after ``timeout``; the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise
        return self.proc.returncode

    def log(self, tail: int = 8000) -> str:
        """The last ``tail`` characters the server wrote."""
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log(1 << 20).splitlines()[-lines:])

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, exc_type: object, *exc_info: object) -> None:
        try:
            self.stop()
        finally:
            self.kill()
