"""``--workers N``: N server processes on one port of one machine, sharing one state.

The parent binds the listening socket and starts N ``python -m service`` children that
inherit it (``NORMCORE_LISTEN_FD``) and accept from it; the kernel hands each connection to
one of them. Each child is a whole server following the shared state (``state_url``:
PostgreSQL; ``state_dir``: SQLite in WAL mode in that folder), with ``cores / N`` torch
threads unless ``NORMCORE_THREADS`` says otherwise. The parent imports neither torch nor the
web framework: it restarts a child that dies (unless it failed its start), and on SIGTERM or
SIGINT stops them all gracefully, exiting 0 if they all did.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from .settings import Settings

LISTEN_FD = "NORMCORE_LISTEN_FD"
STARTED_WELL_S = 10.0  # a child that errs out sooner is not restarted: its start fails
STOP_S = 30.0

log = logging.getLogger("normcore.service")


def listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=2048)
    sock.set_inheritable(True)
    return sock


class Workers:
    """The children of one ``--workers N`` server."""

    def __init__(self, settings: Settings, argv: Sequence[str]) -> None:
        self.settings = settings
        self.argv = list(argv)  # each child parses the same command line
        self.sock = listening_socket(settings.host, settings.port)
        self.env = {**os.environ, LISTEN_FD: str(self.sock.fileno())}
        if "--threads" not in self.argv and "NORMCORE_THREADS" not in os.environ:
            self.env["NORMCORE_THREADS"] = str(max(1, (os.cpu_count() or 1) // settings.workers))
        self.children: list[tuple[subprocess.Popen, float]] = []
        self.stopping = threading.Event()

    def _spawn(self) -> tuple[subprocess.Popen, float]:
        child = subprocess.Popen([sys.executable, "-m", "service", *self.argv], env=self.env,
                                 pass_fds=[self.sock.fileno()])
        return child, time.monotonic()

    def run(self) -> int:
        host, port = self.sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        log.info("normcore running on http://%s:%d with %d workers", shown, port,
                 self.settings.workers)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
        self.children = [self._spawn() for _ in range(self.settings.workers)]
        failed = False
        while not self.stopping.wait(0.2):
            for i, (child, started) in enumerate(self.children):
                if child.poll() is None:
                    continue
                # Killed (a signal) is restarted; an error exit right after the start is a
                # start that fails (a bad catalog, state dir or database): every child would.
                if child.returncode > 0 and time.monotonic() - started < STARTED_WELL_S:
                    log.error("worker %d exited with %s while starting: stopping", child.pid,
                              child.returncode)
                    failed = True
                    self.stopping.set()
                    break
                log.error("worker %d exited with %s: starting another", child.pid,
                          child.returncode)
                self.children[i] = self._spawn()
        return self._stop() or int(failed)

    def _stop(self) -> int:
        for child, _ in self.children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_S
        for child, _ in self.children:
            try:
                child.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        self.sock.close()
        # A child still starting when the stop came ends by the signal itself.
        graceful = (0, -signal.SIGTERM)
        return 0 if all(child.returncode in graceful for child, _ in self.children) else 1


def child_socket() -> socket.socket | None:
    """The socket a ``--workers`` parent handed this process, if any."""
    fd = os.environ.get(LISTEN_FD)
    return None if fd is None else socket.socket(fileno=int(fd))
