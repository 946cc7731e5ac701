"""A real ``python -m service`` process on a free port, for end-to-end tests.

    with ServerProcess(env={"NORMCORE_API_TOKEN": "t"}) as server:
        httpx.get(server.url + "/readyz")

The environment is the caller's minus every ``NORMCORE_*`` variable, plus ``env``, so a
developer's settings never leak into a test. Output goes to a log file (``log()``); a server
that fails to start raises with the log in the message; the log is deleted when the context
exits cleanly.
"""

from __future__ import annotations

import os
import signal
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
                 *, port: int | None = None, ready_timeout: float = 60.0) -> None:
        args = list(args or [])
        if "--port" in args:
            index = args.index("--port") + 1
            if args[index] == "0":
                args[index] = str(free_port())
            port = int(args[index])
        else:
            port = port or free_port()
            args += ["--port", str(port)]
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.args = args
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("NORMCORE_")}
        self.env.update(env or {})
        self.env["PYTHONUNBUFFERED"] = "1"  # the log is complete when a test fails
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT),
                                                               self.env.get("PYTHONPATH")]))
        self.ready_timeout = ready_timeout
        fd, path = tempfile.mkstemp(prefix="normcore-server-", suffix=".log")
        os.close(fd)  # reopened for the process in start()
        self.log_path = Path(path)
        self.proc: subprocess.Popen | None = None

    def start(self, wait_ready: bool = True) -> ServerProcess:
        """Start the process and (by default) wait until ``/readyz`` answers 200."""
        with self.log_path.open("ab") as log:  # the child keeps its own handle
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "service", *self.args], cwd=ROOT, env=self.env,
                stdout=log, stderr=subprocess.STDOUT,
            )
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or self.ready_timeout)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}\n{self.log()}")
            try:
                ready = httpx.get(self.url + "/readyz", timeout=1.0, trust_env=False)
                if ready.status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"server not ready in time\n{self.log()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit in 20 s; the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

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
