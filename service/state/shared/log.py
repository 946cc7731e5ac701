"""SharedLog: the ``ChangeLog`` of replicas that share one database (``shared = True``).

The database orders every replica's changes (a write locks the log's head, so positions
follow commit order); each replica applies them in that order through the store's callback
(``follow``), its own included, so every replica serves the same state. Three threads:

- **writer** (group commit): the changes recorded while the last write ran go out in one
  write (``Postgres.write``: lock the head, claim request_ids, append, commit). It then
  applies what others committed before it, then its own rows; each waiter returns its
  change's ``Folded``, or ``KeyTakenError`` for a request_id committed before.
- **follower**: LISTENs for commits (and polls), applies the rows it has not seen.
- **compaction** (now and then): a snapshot as of the position applied here; the rows an
  older snapshot covers are trimmed, and a replica behind them reloads the snapshot.

If the database cannot be reached, changes are refused at once (503), nothing half-applied;
eval keeps the last state applied; the follower reconnects and catches up. A write whose
reply was lost is settled by looking for its rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import socket
import threading
import uuid

from torch import nn

from ...core.catalog import LayerSpec
from ..changes import Apply, Change, Folded, GroupPacer, KeyTakenError, Waiter
from ..idempotency import KeyWindow
from ..layer_records import origin_spec, spec_meta
from ..records import StateFileError
from .codec import (
    Entry,
    decode_change,
    decode_snapshot,
    encode_change,
    encode_snapshot,
)
from .pending import DatabaseUnavailableError, Pending, reason
from .postgres import Postgres
from .sqlite import SQLite

log = logging.getLogger("normcore.service")

CHUNK = 1000  # log rows read at a time
BATCH_MAX = 512  # changes in one commit
RESOLVE_S = 15.0  # how long a lost commit reply is looked into before giving up


class SharedLog:
    """Changes ordered by one database that every replica writes to and follows."""

    shared = True

    def __init__(self, db: Postgres | SQLite, *, snapshot_every: int = 10_000,
                 keys_kept: int = 10_000, poll_s: float = 0.25, retry_s: float = 1.0) -> None:
        self.db = db
        self.snapshot_every, self.keys_kept = snapshot_every, keys_kept
        self.poll_s, self.retry_s = poll_s, retry_s  # LISTEN's backup poll; reconnects
        self.origin = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._fold_lock = threading.Lock()  # one thread applies changes at a time
        self._folded = 0  # the last log position applied here
        self._snapshot_seq = 0
        self._entries: dict[str, Entry] = {}  # what is served after ``_folded``
        self._deleted: set[str] = set()  # catalog layers deleted through the admin API
        self._catalog: list[LayerSpec] = []
        self._keys: KeyWindow | None = None
        self._apply: Apply | None = None
        self._queue: list[Pending] = []
        self._wake = threading.Condition()
        self._closed = threading.Event()
        self._writer: object | None = None  # the writer's connection
        self._threads: list[threading.Thread] = []
        self._compacting = threading.Lock()
        self._down: str | None = None  # why the database cannot be reached now
        self._failed: str | None = None  # a change that could not be applied here
        self._following = False
        self._batches = itertools.count(1)
        self._written = 0  # the last log position this replica's writer committed

    @property
    def status(self) -> str:
        if self._failed is not None:
            return f"failed: {self._failed}"
        if not self._following:
            return "starting" if self._down is None else f"starting: {self._down}"
        return "durable" if self._down is None else f"unavailable: {self._down}"

    # --- start ----------------------------------------------------------------------------

    def restore(self, specs: list[LayerSpec], keys: KeyWindow) -> list[tuple[LayerSpec,
                                                                          nn.Module]]:
        """The catalog with the database's snapshot over it (waiting for the database)."""
        self._keys, self._catalog = keys, list(specs)
        conn = self._connect_patiently()
        self.db.create_schema(conn)
        snapshot = self.db.snapshot(conn)
        conn.commit()
        self._writer = conn
        seq, self._entries, self._deleted = decode_snapshot(
            None if snapshot is None else snapshot[1], self._catalog, keys)
        self._folded = self._snapshot_seq = seq
        log.info("state database %s: snapshot at %d, %d layers", self.db.describe(), seq,
                 len(self._entries))
        return [(entry.spec, entry.layer) for entry in self._entries.values()]

    def follow(self, apply: Apply) -> None:
        """Apply the rows after the snapshot, then follow the log until closed."""
        self._apply = apply
        with self._fold_lock:
            self._catch_up(self._writer)
            self._writer.commit()
        log.info("state database: caught up at %d", self._folded)
        self._following = True
        for target, name in ((self._write_loop, "writer"), (self._follow_loop, "follower")):
            thread = threading.Thread(target=target, name=f"normcore-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _connect_patiently(self):
        while True:
            try:
                conn = self.db.connect()
                self._down = None
                return conn
            except self.db.UNAVAILABLE as exc:
                if self._down is None:
                    log.error("%s; retrying every %g s", reason(exc), self.retry_s)
                self._down = reason(exc)
            if self._closed.wait(self.retry_s):
                raise DatabaseUnavailableError("stopped while waiting for the state database")

    # --- applying -------------------------------------------------------------------------

    def _spec_of(self, name: str) -> LayerSpec | None:
        return entry.spec if (entry := self._entries.get(name)) is not None else None

    def _catch_up(self, conn, head: int | None = None) -> None:
        """Apply the committed rows after ``_folded`` (up to ``head`` if given: the writer,
        whose own rows follow). Holds: ``_fold_lock``."""
        reloaded = False
        while head is None or self._folded < head:
            limit = CHUNK if head is None else min(CHUNK, head - self._folded)
            rows = self.db.rows(conn, self._folded, limit)
            behind = head is not None and head > self._folded
            if (rows and rows[0][0] != self._folded + 1) or (not rows and behind):
                if reloaded:
                    raise StateFileError(f"the state database's log has a gap after "
                                         f"{self._folded} that its snapshot does not cover")
                self._reload(conn)  # the rows we need were trimmed: start from the snapshot
                reloaded = True
                continue
            for seq, _origin, op, name, body in rows:
                self._fold(seq, decode_change(seq, op, name, bytes(body), self._spec_of))
            if len(rows) < limit:
                return

    def _fold(self, seq: int, change: Change) -> Folded:
        """Apply the change at ``seq`` here. Holds: ``_fold_lock``."""
        try:
            folded = self._apply(change)
        except Exception as exc:
            self._failed = f"log record {seq} could not be applied ({exc}); restart to recover"
            log.critical("%s", self._failed)
            raise
        self._folded = seq
        name = change.name
        if change.op == "delete":
            self._entries.pop(name, None)
            self._deleted.add(name)
        elif folded.layer is not None:
            old = self._entries.get(name)
            uploaded = change.op == "put" or (old is not None and old.uploaded)
            self._entries[name] = Entry(folded.spec, folded.layer, uploaded)
            if change.op == "put":
                self._deleted.discard(name)
        if self._folded - self._snapshot_seq >= self.snapshot_every:
            self._start_compaction()
        return folded

    def _reload(self, conn) -> None:
        """Serve the database's snapshot in place of everything applied here."""
        snapshot = self.db.snapshot(conn)
        if snapshot is None:
            raise StateFileError("the state database's log was trimmed without a snapshot")
        seq, entries, deleted = decode_snapshot(snapshot[1], self._catalog, self._keys)
        log.warning("applied up to %d but the log now starts later: reloading the snapshot "
                    "at %d", self._folded, seq)
        for name in set(self._entries) - set(entries):
            self._apply(Change("delete", name))
        for name, entry in entries.items():
            self._apply(Change("put", name, entry.layer, spec=entry.spec))
        self._entries, self._deleted = entries, deleted & {s.name for s in self._catalog}
        self._folded = self._snapshot_seq = seq

    # --- recording ------------------------------------------------------------------------

    def record(self, change: Change) -> Waiter:
        """Queue ``change`` for the next group commit; the waiter returns its ``Folded``."""
        if self._failed is not None:
            raise DatabaseUnavailableError(f"state changes are refused: {self._failed}")
        if not self._following or self._closed.is_set():
            raise DatabaseUnavailableError("state changes are refused: the state database "
                                           "is not followed (starting or stopping)")
        if self._down is not None:
            raise DatabaseUnavailableError(f"state changes are refused: {self._down}; they "
                                           "are taken again once it answers")
        if change.op == "put":
            state = {k: v.detach().cpu().clone() for k, v in change.layer.state_dict().items()}
            spec = origin_spec(change.name, spec_meta(change.spec), state)
            change = dataclasses.replace(change, spec=spec)
        pending = Pending(change, encode_change(change))
        with self._wake:
            self._queue.append(pending)
            self._wake.notify()
        return pending.future

    def _write_loop(self) -> None:
        pacer = GroupPacer()
        while True:
            pacer.wait()
            with self._wake:
                while not self._queue and not self._closed.is_set():
                    self._wake.wait()
                if not self._queue:
                    return
                batch, self._queue = self._queue[:BATCH_MAX], self._queue[BATCH_MAX:]
            try:
                self._write(batch)
                pacer.wrote(len(batch))
            except BaseException as exc:  # a bug: answer, keep serving
                log.exception("writing to the state database failed")
                self._fail(batch, exc)

    def _write(self, batch: list[Pending]) -> None:
        """Commit ``batch`` in one write, apply what others committed before it, then it."""
        token = f"{self.origin}/{next(self._batches)}"
        entries = [(p.change.key, None if p.change.applied is None else p.change.applied.digest,
                    p.change.op, p.change.name, p.body) for p in batch]
        with self._fold_lock:
            for attempt in (1, 2):
                sent = False  # a write that never left cannot have been committed
                try:
                    self._writer = self._writer or self.db.connect()
                    sent = True
                    head, accepted = self.db.write(self._writer, token, entries)
                    self._written = head + len(accepted)  # the follower need not read them
                    self._down = None
                    break
                except self.db.UNAVAILABLE as exc:
                    self._drop_writer()
                    self._lost(exc)  # new changes are refused at once meanwhile
                    written = self._rows_of(token) if sent else []  # committed after all?
                    if written:
                        head, accepted = _match(batch, written)
                        break
                    if written is None or attempt == 2 or self._closed.is_set():
                        return self._fail(batch, DatabaseUnavailableError(
                            f"not applied: {reason(exc)}" if written is not None else
                            "the state database went away while committing: whether the "
                            "change was applied is unknown; retry with the same request_id"))
                    # Not applied: a connection from before a database restart. Once more.
                except BaseException as exc:
                    self._drop_writer()
                    return self._fail(batch, exc)
            try:
                self._apply_through(head)
                for seq, i in enumerate(accepted, start=head + 1):
                    batch[i].settle(self._fold(seq, batch[i].change))
            except Exception as exc:
                return self._fail(batch, exc)
            for pending in batch:  # the keys another change holds: applied above
                pending.settle(error=KeyTakenError(pending.change.key))
        return None

    def _apply_through(self, head: int) -> None:
        """Apply the rows others committed before our write, retried until they are read."""
        while self._folded < head:
            try:
                if self._writer is None:
                    self._writer = self.db.connect()
                self._catch_up(self._writer, head)
            except self.db.UNAVAILABLE as exc:
                self._drop_writer()
                self._lost(exc)
                if self._closed.wait(self.retry_s):
                    raise DatabaseUnavailableError("stopped before the state database answered; "
                                                   "the change is committed") from None

    def _rows_of(self, token: str) -> list | None:
        """The rows of the write ``token`` (empty: it was not committed), asked once the
        database answers; None if it does not answer in time."""
        for _ in range(max(1, int(RESOLVE_S / self.retry_s))):
            try:
                with self.db.connect() as conn:
                    return self.db.written(conn, token)
            except self.db.UNAVAILABLE:
                if self._closed.wait(self.retry_s):
                    break
        return None

    def _fail(self, batch: list[Pending], error: BaseException) -> None:
        for pending in batch:
            pending.settle(error=error)

    def _drop_writer(self) -> None:
        conn, self._writer = self._writer, None
        if conn is not None:
            with contextlib.suppress(Exception):  # closing a broken connection
                conn.close()

    def _lost(self, exc: BaseException) -> None:
        if self._down is None:
            log.error("%s: changes are refused until it answers; eval serves the last state "
                      "applied", reason(exc))
        self._down = reason(exc)

    # --- following ------------------------------------------------------------------------

    def _follow_loop(self) -> None:
        conn = None
        while not self._closed.is_set():
            try:
                if conn is None:
                    conn = self.db.connect()
                    self.db.listen(conn)
                with self._fold_lock:
                    self._catch_up(conn)
                if self._down is not None:
                    log.warning("the state database answers again: changes are taken")
                    self._down = None
                # This replica's own commits are applied by its writer: wait past them.
                while (seq := self.db.wait(conn, self.poll_s)) is not None \
                        and seq <= max(self._folded, self._written) \
                        and not self._closed.is_set():
                    pass
            except self.db.UNAVAILABLE as exc:
                self._lost(exc)
                if conn is not None:
                    conn.close()
                conn = None
                self._closed.wait(self.retry_s)
            except Exception:  # a change that cannot be applied: status says failed
                log.exception("following the state database failed")
                self._closed.wait(self.retry_s)
        if conn is not None:
            conn.close()

    # --- snapshots ------------------------------------------------------------------------

    def _start_compaction(self) -> None:
        """Snapshot the state as of ``_folded`` in the background. Holds: ``_fold_lock``."""
        if not self._compacting.acquire(blocking=False):
            return
        captured = (self._folded, dict(self._entries), set(self._deleted),
                    self._keys.recorded())
        threading.Thread(target=self._compact, args=captured, name="normcore-snapshot",
                         daemon=True).start()

    def _compact(self, seq: int, entries: dict[str, Entry], deleted: set[str],
                 keys: list) -> None:
        try:
            body = encode_snapshot(seq, entries, deleted, keys)
            with self.db.connect() as conn:
                self.db.save_snapshot(conn, seq, body, self.keys_kept)
                self._snapshot_seq = max(seq, self.db.snapshot_seq(conn))
            log.info("state database: snapshot at %d", seq)
        except Exception as exc:  # the log keeps every change meanwhile
            log.error("snapshot failed (the log still holds every change): %s", exc)
            self._snapshot_seq = seq  # try again after another snapshot_every changes
        finally:
            self._compacting.release()

    def close(self) -> None:
        """Commit what is queued, stop following; later changes are refused."""
        self._closed.set()
        with self._wake:
            self._wake.notify_all()
        for thread in self._threads:
            thread.join(30)
        with self._fold_lock:
            self._drop_writer()


def _match(batch: list[Pending], written: list) -> tuple[int, list[int]]:
    """(head before, indices appended) of a write found by its rows: they hold the batch's
    changes in order, less those whose key was claimed before."""
    accepted, j = [], 0
    for i, pending in enumerate(batch):
        if j < len(written) and bytes(written[j][4]) == pending.body:
            accepted.append(i)
            j += 1
    return written[0][0] - 1, accepted
