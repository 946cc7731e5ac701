"""A throwaway PostgreSQL cluster for the tests: Debian's server binaries, started for real.

    cluster = Cluster.create()          # initdb into a temporary folder, trust auth
    cluster.start()                     # on a free port of 127.0.0.1
    url = cluster.new_database()        # postgresql://postgres@127.0.0.1:PORT/t_<random>
    cluster.stop("immediate")           # a crash, as far as clients can tell
    cluster.destroy()                   # stop and delete the folder

``initdb`` and ``pg_ctl`` run as the ``postgres`` user when the tests run as root (the
server refuses to run as root). The folder is made under /tmp, outside pytest's private
temporary tree, so that user can reach it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

from tests.server_process import free_port


def bindir() -> Path | None:
    """Where ``initdb`` and ``pg_ctl`` are, or None if PostgreSQL is not installed."""
    if shutil.which("pg_config") is None:
        return None
    out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=False)
    folder = Path(out.stdout.strip())
    return folder if (folder / "initdb").exists() and (folder / "pg_ctl").exists() else None


class Cluster:
    """One PostgreSQL server in a folder of its own."""

    def __init__(self, bin: Path, root: Path) -> None:
        self.bin = bin
        self.root = root
        self.data = root / "data"
        self.port = free_port()
        self.log = root / "server.log"

    @classmethod
    def create(cls) -> Cluster:
        folder = bindir()
        if folder is None:
            raise RuntimeError("PostgreSQL is not installed (no pg_config with initdb/pg_ctl)")
        root = Path(tempfile.mkdtemp(prefix="normcore-pg-"))
        cluster = cls(folder, root)
        if os.geteuid() == 0:
            shutil.chown(root, "postgres", "postgres")
        cluster._run("initdb", "-D", str(cluster.data), "-A", "trust", "-U", "postgres",
                     "-E", "UTF8", "--no-sync")
        return cluster

    def _run(self, tool: str, *args: str) -> subprocess.CompletedProcess:
        cmd = [str(self.bin / tool), *args]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{tool} failed ({proc.returncode}): {proc.stdout}{proc.stderr}"
                               f"{self.tail()}")
        return proc

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w",
                  "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        """``fast``: a clean shutdown; ``immediate``: no checkpoint, recovery at the next
        start (what a crash of the database looks like to its clients)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def destroy(self) -> None:
        try:
            if self.running():
                self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
