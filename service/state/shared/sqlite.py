"""SQLite in WAL mode as the shared log's database: the worker processes of one machine
(``--workers N --state-dir DIR``) share ``DIR/shared.db`` as replicas share PostgreSQL.

The same tables and statements as ``postgres.py``, in SQLite's words: a writer takes the
database's write lock (``BEGIN IMMEDIATE``) where PostgreSQL locks the head row, commits
are synced to the write-ahead log (``synchronous = FULL``) before they are acknowledged,
and followers poll ``PRAGMA data_version`` (which changes when another connection
commits) where PostgreSQL notifies.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

FILE = "shared.db"

SCHEMA = """
CREATE TABLE IF NOT EXISTS normcore_head (id INTEGER PRIMARY KEY CHECK (id = 1),
                                          seq INTEGER NOT NULL);
INSERT OR IGNORE INTO normcore_head VALUES (1, 0);
CREATE TABLE IF NOT EXISTS normcore_log (seq INTEGER PRIMARY KEY, origin TEXT NOT NULL,
                                         op TEXT NOT NULL, layer TEXT NOT NULL,
                                         body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS normcore_keys (key TEXT PRIMARY KEY, layer TEXT NOT NULL,
                                          digest TEXT NOT NULL, seq INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS normcore_keys_seq ON normcore_keys (seq);
CREATE TABLE IF NOT EXISTS normcore_snapshot (id INTEGER PRIMARY KEY CHECK (id = 1),
                                              seq INTEGER NOT NULL, body BLOB NOT NULL)
"""

Row = tuple[int, str, str, str, bytes]  # seq, origin, op, layer, body
Entry = tuple[str | None, str | None, str, str, bytes]  # key, digest, op, layer, body
_POLL_S = 0.01  # how often a follower looks at data_version while it waits


class Connection:
    """A sqlite3 connection that behaves as the shared log expects of one: statements run
    in autocommit mode unless a write began (``BEGIN``); ``with`` closes it."""

    def __init__(self, path: Path) -> None:
        self.raw = sqlite3.connect(path, timeout=60, isolation_level=None,
                                   check_same_thread=False)
        self.raw.execute("PRAGMA journal_mode = WAL")
        self.raw.execute("PRAGMA synchronous = FULL")
        self.version = None

    def execute(self, sql: str, params: tuple | list = ()) -> sqlite3.Cursor:
        return self.raw.execute(sql, params)

    def commit(self) -> None:
        if self.raw.in_transaction:
            self.raw.execute("COMMIT")

    def rollback(self) -> None:
        if self.raw.in_transaction:
            self.raw.execute("ROLLBACK")

    def close(self) -> None:
        self.raw.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if exc_info[0] is None:
            self.commit()
        self.close()


class SQLite:
    """The statements of the shared log on one SQLite file."""

    # A file that cannot be read or written (a full disk, a lock held too long).
    UNAVAILABLE = (sqlite3.OperationalError,)

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / FILE

    def describe(self) -> str:
        return str(self.path)

    def connect(self) -> Connection:
        self.folder.mkdir(parents=True, exist_ok=True)
        return Connection(self.path)

    def create_schema(self, conn: Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        for statement in filter(str.strip, SCHEMA.split(";")):
            conn.execute(statement)
        conn.commit()

    # --- reading ------------------------------------------------------------------------------

    def rows(self, conn: Connection, after: int, limit: int) -> list[Row]:
        return conn.execute("SELECT seq, origin, op, layer, body FROM normcore_log "
                            "WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit)).fetchall()

    def snapshot(self, conn: Connection) -> tuple[int, bytes] | None:
        row = conn.execute("SELECT seq, body FROM normcore_snapshot WHERE id = 1").fetchone()
        return None if row is None else (row[0], bytes(row[1]))

    def snapshot_seq(self, conn: Connection) -> int:
        row = conn.execute("SELECT seq FROM normcore_snapshot WHERE id = 1").fetchone()
        return 0 if row is None else row[0]

    # --- writing ------------------------------------------------------------------------------

    def write(self, conn: Connection, origin: str, entries: list[Entry]
              ) -> tuple[int, list[int]]:
        """``Postgres.write`` in one SQLite transaction under the database's write lock."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            head = conn.execute("SELECT seq FROM normcore_head WHERE id = 1").fetchone()[0]
            accepted, rows = [], []
            for i, (key, digest, op, layer, body) in enumerate(entries):
                if key is not None and conn.execute(
                        "INSERT OR IGNORE INTO normcore_keys (key, layer, digest, seq) "
                        "VALUES (?, ?, ?, ?)", (key, layer, digest, head + 1)).rowcount == 0:
                    continue  # claimed before
                accepted.append(i)
                rows.append((head + len(rows) + 1, origin, op, layer, body))
            if rows:
                conn.raw.executemany("INSERT INTO normcore_log (seq, origin, op, layer, body) "
                                     "VALUES (?, ?, ?, ?, ?)", rows)
                conn.execute("UPDATE normcore_head SET seq = ? WHERE id = 1", (rows[-1][0],))
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
        return head, accepted

    def written(self, conn: Connection, origin: str) -> list[Row]:
        return conn.execute("SELECT seq, origin, op, layer, body FROM normcore_log "
                            "WHERE origin = ? ORDER BY seq", (origin,)).fetchall()

    def save_snapshot(self, conn: Connection, seq: int, body: bytes, keys_kept: int) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            previous = self.snapshot_seq(conn)
            if previous < seq:
                conn.execute("INSERT INTO normcore_snapshot (id, seq, body) VALUES (1, ?, ?) "
                             "ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, "
                             "body = excluded.body", (seq, body))
                conn.execute("DELETE FROM normcore_log WHERE seq <= ?", (previous,))
                conn.execute("DELETE FROM normcore_keys WHERE seq < (SELECT seq FROM "
                             "normcore_keys ORDER BY seq DESC LIMIT 1 OFFSET ?)", (keys_kept,))
            conn.commit()
        except BaseException:
            conn.rollback()
            raise

    def save_first_snapshot(self, conn: Connection, body: bytes) -> None:
        """The state a fresh database starts from (position 0: every change follows it)."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            if conn.execute("SELECT seq FROM normcore_head").fetchone()[0] != 0:
                raise RuntimeError(f"{self.path} is not a fresh database")
            conn.execute("INSERT INTO normcore_snapshot (id, seq, body) VALUES (1, 0, ?)",
                         (body,))
            conn.commit()
        except BaseException:
            conn.rollback()
            raise

    # --- following -----------------------------------------------------------------------------

    def listen(self, conn: Connection) -> None:
        conn.version = conn.execute("PRAGMA data_version").fetchone()[0]

    def wait(self, conn: Connection, timeout: float) -> None:
        """Until another connection commits or ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            version = conn.execute("PRAGMA data_version").fetchone()[0]
            if version != conn.version:
                conn.version = version
                return
            time.sleep(_POLL_S)
