"""A real server process on a free port of 127.0.0.1, for end-to-end tests and benchmarks.

    with service_process(["--state-dir", str(tmp)], env={"NORMCORE_API_TOKEN": "t"}) as server:
        httpx.get(server.url + "/readyz")

    echo = ServerProcess([sys.executable, "-m", "uvicorn", "app:app", "--port", "{port}"],
                         ready="/readyz", cwd=folder).start()

Any command line serves: ``"{port}"`` in an argument or an ``env`` value becomes a port that
was free a moment before the start (or ``port``, when the caller chose one), unless
``port_from_log`` names the line the server logs once listening: then the command binds port
0 (no race for a free port) and the port is read from the log. ``start()`` waits until
``ready`` answers: a path that must answer 200, or a callable given the process.

The environment is the caller's minus every ``NORMCORE_*`` variable, plus
``PYTHONUNBUFFERED=1`` and ``env``, so a developer's settings never leak into a test or a
measurement. The server's output (stdout and
stderr) goes to ``log``, a temporary file by default, which every start error quotes.
``start()`` may be called again after a stop or a kill: the same log file grows. Each server
runs in a process group of its own, so stopping it also ends any workers it forked.

Only the standard library: benchmark scripts import this module too (after putting the
repository root on ``sys.path``), in whatever environment they run.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PORT = "{port}"
# uvicorn's start-up line, logged at level info: "Uvicorn running on http://127.0.0.1:8000".
UVICORN_LISTENING = re.compile(r"running on http://[^:\s]+:(\d+)")


class ServerError(RuntimeError):
    """The server exited or did not become ready; the message ends with its log's tail."""


def free_port() -> int:
    """A port of 127.0.0.1 that was free when asked (another process may take it since)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``cmd`` run as a server on 127.0.0.1; ``url``, ``port`` and ``log()`` once started.

    ``cwd=None`` runs it in a new empty folder. That folder and a log file made here (no
    ``log`` given) go when the object does, or at exit: a test run leaves nothing in the
    temp folder. Only the log of a server that never became ready stays, for its error names it.
    """

    def __init__(self, cmd: Sequence[str], *, env: Mapping[str, str] | None = None,
                 ready: str | Callable[[ServerProcess], bool] | None = "/readyz",
                 port: int | None = None, port_from_log: re.Pattern[str] | None = None,
                 ready_timeout: float = 60.0, log: Path | None = None,
                 cwd: Path | None = ROOT, name: str | None = None) -> None:
        if port is None and port_from_log is None:
            if not any(PORT in part for part in [*cmd, *(env or {}).values()]):
                raise ValueError(f"{list(cmd)}: no {PORT} in the command or env, no port, "
                                 "no port_from_log: the server's port is unknown")
            port = free_port()
        self.port = port
        self.port_from_log = port_from_log
        self.cmd = [self._fill(part) for part in cmd]
        self.name = name or " ".join([Path(cmd[0]).name, *self.cmd[1:3]])
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("NORMCORE_")}
        self.env["PYTHONUNBUFFERED"] = "1"  # the log is complete when a test fails
        self.env.update({k: self._fill(v) for k, v in (env or {}).items()})
        self.ready = ready
        self.ready_timeout = ready_timeout
        if cwd is None:
            cwd = Path(tempfile.mkdtemp(prefix="normcore-server-cwd-"))
            weakref.finalize(self, shutil.rmtree, cwd, ignore_errors=True)
        self.cwd = cwd
        self._own_log: weakref.finalize | None = None
        if log is None:
            fd, path = tempfile.mkstemp(prefix="normcore-server-", suffix=".log")
            os.close(fd)
            log = Path(path)
            self._own_log = weakref.finalize(self, log.unlink, missing_ok=True)
        self.log_path = log
        self.proc: subprocess.Popen | None = None

    def _fill(self, text: str) -> str:
        return text if self.port is None else text.replace(PORT, str(self.port))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> ServerProcess:
        """Start the process and wait until it is ready; ServerError if it never is."""
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as out:  # the child keeps its own handle
            self.proc = subprocess.Popen(self.cmd, cwd=self.cwd, env=self.env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        if self.port_from_log is not None:
            self.port = None
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise self._error(f"exited with {self.proc.returncode}")
            if self.port is None:
                text = self.log_path.read_bytes()[offset:].decode(errors="replace")
                found = self.port_from_log.search(text)
                self.port = int(found.group(1)) if found else None
            elif self._ready():
                return self
            time.sleep(0.05)
        self.kill()
        raise self._error(f"not ready after {self.ready_timeout:g} s")

    def _error(self, what: str) -> ServerError:
        if self._own_log is not None:
            self._own_log.detach()  # the error names it
        return ServerError(f"{self.name} {what}; the end of its log, {self.log_path}:\n"
                           f"{self.tail()}")

    def _ready(self) -> bool:
        if self.ready is None:
            return True
        if callable(self.ready):
            return self.ready(self)
        # http.client, not urllib: no proxy from the environment gets between.
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2.0)
        try:
            conn.request("GET", self.ready)
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL to the whole group: no clean-up of any kind runs in the server."""
        if self.alive():
            self._signal_group(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (a graceful stop), SIGKILL after ``timeout``; the exit status (negative: the
        signal that ended it), or None if it never started."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def _signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):  # the group is gone
            os.killpg(self.proc.pid, sig)

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


def service_process(args: Sequence[str] = (), env: Mapping[str, str] | None = None,
                    **options) -> ServerProcess:
    """``python -m service *args`` from this checkout, ready when ``/readyz`` answers 200.

    Unless ``args`` name a ``--port`` (``"{port}"`` for a free one, as a server that logs
    below level info needs), it binds port 0 and the port is read from uvicorn's start-up
    line. gRPC is off unless ``args`` or ``env`` name its port. ``options`` go to
    ServerProcess (``log``, ``ready_timeout``, ...); the working folder is a new empty one
    unless ``cwd`` says otherwise (the server reads ``.env`` there).
    """
    args = list(args)
    if "--port" not in args:
        args += ["--port", "0"]
        options.setdefault("port_from_log", UVICORN_LISTENING)
    if "--grpc-port" not in args and "NORMCORE_GRPC_PORT" not in (env or {}):
        args += ["--grpc-port", "0"]  # no fixed port that another server could hold
    env = dict(env or {})
    inherited = env.get("PYTHONPATH", os.environ.get("PYTHONPATH"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), inherited]))
    options.setdefault("name", "python -m service")
    # A folder of its own, so no .env lying in the checkout reaches the server.
    options.setdefault("cwd", None)
    return ServerProcess([sys.executable, "-m", "service", *args], env=env, **options)
