"""A real ``python -m service`` process for end-to-end tests.

    with ServerProcess(["--port", "0"]) as server:     # port 0: a free one is picked
        httpx.get(server.url + "/readyz")

The environment is the caller's minus every ``NORMCORE_*`` variable, plus ``env``, so a
developer's settings never leak into a test. Output goes to a log file; a server that
fails to start raises with the log's tail in the message; the log is deleted when the
context exits cleanly.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``python -m service`` with ``args`` (flags) and ``env`` (NORMCORE_* settings)."""

    def __init__(self, args: list[str] | None = None, env: dict[str, str] | None = None,
                 *, ready_timeout: float = 60.0) -> None:
        args = list(args or [])
        if "--port" not in args:
            args += ["--port", "0"]
        index = args.index("--port") + 1
        if args[index] == "0":
            args[index] = str(free_port())
        self.port = int(args[index])
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = args
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("NORMCORE_")}
        self.env.update(env or {})
        self.env["PYTHONUNBUFFERED"] = "1"  # the log is complete when a test fails
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT),
                                                               self.env.get("PYTHONPATH")]))
        self.ready_timeout = ready_timeout
        fd, log_path = tempfile.mkstemp(prefix="normcore-server-", suffix=".log")
        os.close(fd)  # reopened for the process in start()
        self.log_path = Path(log_path)
        self._process: subprocess.Popen | None = None

    def start(self) -> ServerProcess:
        """Start the process and wait until ``/readyz`` answers 200."""
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "service", *self.args], cwd=ROOT, env=self.env,
                stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"server exited with {self._process.returncode}\n"
                                   f"{self.log()}")
            try:
                ready = httpx.get(self.url + "/readyz", timeout=1.0, trust_env=False)
                if ready.status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server not ready after {self.ready_timeout} s\n{self.log()}")

    def stop(self) -> None:
        """Terminate the process (kill it if it does not exit in 10 s)."""
        if self._process is None or self._process.poll() is not None:
            return
        self._process.terminate()
        try:
            self._process.wait(10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log(self, tail: int = 8000) -> str:
        """The last ``tail`` characters the server wrote."""
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, exc_type: object, *exc_info: object) -> None:
        self.stop()
        if exc_type is None:  # keep the log of a failed run for a look afterwards
            self.log_path.unlink(missing_ok=True)
