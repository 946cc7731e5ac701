"""PostgreSQL as the shared log's database (psycopg 3): the tables and every statement.

    normcore_head      one row: the last log position committed. A writer locks it
                       (SELECT ... FOR UPDATE) for its whole transaction, so positions are
                       given out in commit order and a reader never sees a later change
                       without every earlier one.
    normcore_log       (seq, origin, op, layer, body): one change per row (``codec.py``)
    normcore_keys      request_id -> layer, digest: the one place a key is claimed, so a
                       retry sent to another replica is applied once
    normcore_snapshot  one row: the state as of a log position; older rows are trimmed

Commits are synchronous (``synchronous_commit = on`` for these sessions), so a committed
change is on the database's disk. Each commit notifies the channel ``normcore_log``; the
other replicas LISTEN on it, and poll as well, so a missed notification only delays them.
"""

from __future__ import annotations

import psycopg

CHANNEL = "normcore_log"
_SCHEMA_LOCK = 0x6E6F726D  # an advisory lock id: one replica creates the tables at a time

SCHEMA = """
CREATE TABLE IF NOT EXISTS normcore_head (
    id int PRIMARY KEY CHECK (id = 1),
    seq bigint NOT NULL
);
INSERT INTO normcore_head VALUES (1, 0) ON CONFLICT DO NOTHING;
CREATE TABLE IF NOT EXISTS normcore_log (
    seq bigint PRIMARY KEY,
    origin text NOT NULL,
    op text NOT NULL,
    layer text NOT NULL,
    body bytea NOT NULL
);
CREATE TABLE IF NOT EXISTS normcore_keys (
    key text PRIMARY KEY,
    layer text NOT NULL,
    digest text NOT NULL,
    seq bigint NOT NULL
);
CREATE INDEX IF NOT EXISTS normcore_keys_seq ON normcore_keys (seq);
CREATE TABLE IF NOT EXISTS normcore_snapshot (
    id int PRIMARY KEY CHECK (id = 1),
    seq bigint NOT NULL,
    body bytea NOT NULL
);
"""

Row = tuple[int, str, str, str, bytes]  # seq, origin, op, layer, body
Entry = tuple[str | None, str | None, str, str, bytes]  # key, digest, op, layer, body

# One write, one round trip. The head row is locked first (FOR UPDATE waits for the writer
# before, then reads the head it left); a key committed before is not claimed again.
WRITE = """
WITH head AS (SELECT seq FROM normcore_head WHERE id = 1 FOR UPDATE),
input AS (
    SELECT * FROM unnest(%s::int[], %s::text[], %s::text[], %s::text[], %s::text[],
                         %s::bytea[]) AS t(i, key, digest, op, layer, body)),
claimed AS (
    INSERT INTO normcore_keys (key, layer, digest, seq)
    SELECT key, layer, digest, (SELECT seq FROM head) + 1 FROM input WHERE key IS NOT NULL
    ON CONFLICT (key) DO NOTHING RETURNING key),
accepted AS (
    SELECT i, op, layer, body, (SELECT seq FROM head) + row_number() OVER (ORDER BY i) AS seq
    FROM input WHERE key IS NULL OR key IN (SELECT key FROM claimed)),
appended AS (
    INSERT INTO normcore_log (seq, origin, op, layer, body)
    SELECT seq, %s, op, layer, body FROM accepted),
last AS (SELECT (SELECT seq FROM head) + (SELECT count(*) FROM accepted) AS seq),
moved AS (UPDATE normcore_head SET seq = (SELECT seq FROM last) WHERE id = 1)
SELECT (SELECT seq FROM head), ARRAY(SELECT i FROM accepted ORDER BY i),
       pg_notify('normcore_log', (SELECT seq FROM last)::text)
"""


class Postgres:
    """The statements of the shared log, on connections to one database."""

    # The database cannot be reached, went away, or is shutting down.
    UNAVAILABLE = (psycopg.OperationalError, psycopg.InterfaceError)

    def __init__(self, url: str, *, connect_timeout: float = 3.0) -> None:
        self._url = url
        self.connect_timeout = connect_timeout

    def describe(self) -> str:
        """Where the database is, without the password."""
        info = psycopg.conninfo.conninfo_to_dict(self._url)
        return f"postgresql://{info.get('host', '')}:{info.get('port', 5432)}/" \
               f"{info.get('dbname', '')}"

    def connect(self) -> psycopg.Connection:
        """A connection in autocommit mode: each statement is a transaction of its own."""
        conn = psycopg.connect(
            self._url, autocommit=True, connect_timeout=max(1, int(self.connect_timeout)),
            application_name="normcore", keepalives=1, keepalives_idle=5,
            keepalives_interval=2, keepalives_count=3)
        conn.execute("SET synchronous_commit = on")
        return conn

    def create_schema(self, conn: psycopg.Connection) -> None:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            for statement in filter(str.strip, SCHEMA.split(";")):
                conn.execute(statement)

    # --- reading ------------------------------------------------------------------------------

    def rows(self, conn: psycopg.Connection, after: int, limit: int) -> list[Row]:
        return conn.execute(
            "SELECT seq, origin, op, layer, body FROM normcore_log WHERE seq > %s "
            "ORDER BY seq LIMIT %s", (after, limit)).fetchall()

    def snapshot(self, conn: psycopg.Connection) -> tuple[int, bytes] | None:
        row = conn.execute("SELECT seq, body FROM normcore_snapshot WHERE id = 1").fetchone()
        return None if row is None else (row[0], bytes(row[1]))

    def snapshot_seq(self, conn: psycopg.Connection) -> int:
        row = conn.execute("SELECT seq FROM normcore_snapshot WHERE id = 1").fetchone()
        return 0 if row is None else row[0]

    # --- writing ------------------------------------------------------------------------------

    def write(self, conn: psycopg.Connection, origin: str, entries: list[Entry]
              ) -> tuple[int, list[int]]:
        """Append ``entries`` (key, digest, op, layer, body) after the head, in one statement
        and so one transaction (``conn`` is in autocommit mode): lock the head, claim the
        keys, append the entries whose key was free (or that have none) as ``origin``, move
        the head past them, notify. (The head before, the indices of the entries appended.)"""
        columns = [list(column) for column in zip(*entries, strict=True)]
        row = conn.execute(WRITE, (list(range(len(entries))), *columns, origin)).fetchone()
        return row[0], list(row[1])

    def written(self, conn: psycopg.Connection, origin: str) -> list[Row]:
        """The rows ``origin`` appended (to settle a write whose reply was lost)."""
        return conn.execute("SELECT seq, origin, op, layer, body FROM normcore_log "
                            "WHERE origin = %s ORDER BY seq", (origin,)).fetchall()

    def save_snapshot(self, conn: psycopg.Connection, seq: int, body: bytes,
                      keys_kept: int) -> None:
        """Keep ``body`` as the snapshot at ``seq`` unless a newer one is there; drop the
        log rows the previous snapshot covered (a lagging replica still finds the rows after
        it) and all but the newest ``keys_kept`` request_ids."""
        with conn.transaction():
            previous = self.snapshot_seq(conn)
            if previous >= seq:
                return
            conn.execute(
                "INSERT INTO normcore_snapshot (id, seq, body) VALUES (1, %s, %s) "
                "ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, body = excluded.body",
                (seq, body))
            conn.execute("DELETE FROM normcore_log WHERE seq <= %s", (previous,))
            conn.execute(
                "DELETE FROM normcore_keys WHERE seq < (SELECT seq FROM normcore_keys "
                "ORDER BY seq DESC OFFSET %s LIMIT 1)", (keys_kept,))

    # --- following -----------------------------------------------------------------------------

    def listen(self, conn: psycopg.Connection) -> None:
        """``conn`` (autocommit) hears every commit from now on."""
        conn.execute(f"LISTEN {CHANNEL}")

    def wait(self, conn: psycopg.Connection, timeout: float) -> int | None:
        """Until a commit is announced on ``conn`` or ``timeout`` seconds pass; the log
        position it announced, if any."""
        for notify in conn.notifies(timeout=timeout, stop_after=1):
            return int(notify.payload)
        return None
