"""The append-only journal: every applied change, fsynced before it is acknowledged.

Files are ``journal-<generation>.log`` in the state dir; each holds checksummed frames
(``records.py``). A change is written under the caller's lock, so the file's order is
the order in which changes were applied, and made durable afterwards by ``sync``.

Group commit: ``sync(seq)`` returns once some fsync that started after record ``seq`` was
written has finished. One waiter at a time runs the fsync (the leader) and covers every
record written before it started; the others wait, and whoever still needs more goes next.
While one fsync runs the next batch gathers, so throughput holds under concurrency while
each request still waits for exactly one or two fsyncs.

``waiter(seq)`` is the same wait as a future, settled by one syncing thread for a whole
group (paced by a ``GroupPacer``), so a request waiting for its record holds no thread.

A failed fsync is final. After it the kernel may have dropped the dirty pages and marked
them clean, so a retry can "succeed" without the data ever reaching the disk (PostgreSQL's
fsyncgate, 2018). The journal refuses every later change and the server must restart,
recovering from what is on disk. The records that were not yet safe were never
acknowledged, so the file is cut back to the last synced byte (best effort: a disk that
fails the cut too may keep them), and a restart does not apply them after all.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path

from ..core.errors import UnavailableError
from .changes import GroupPacer
from .records import StateFileError, read_frames

log = logging.getLogger("normcore.service")

_NAME = re.compile(r"^journal-(\d{8})\.log$")


class JournalFailedError(UnavailableError):
    """A change could not be made durable; no change is accepted until a restart."""


def journal_path(folder: Path, generation: int) -> Path:
    return folder / f"journal-{generation:08d}.log"


def journal_generations(folder: Path) -> list[int]:
    """The generations of the journal files in ``folder``, oldest first."""
    found = (_NAME.match(p.name) for p in folder.iterdir())
    return sorted(int(m.group(1)) for m in found if m)


def fsync_folder(folder: Path) -> None:
    """Make a create, rename or unlink in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    """Appends frames to the current journal file; ``sync`` makes them durable."""

    def __init__(self, folder: Path, generation: int, *,
                 fsync: Callable[[int], None] = os.fdatasync) -> None:
        self.folder = folder
        self.generation = generation
        self._fsync = fsync
        self._cond = threading.Condition()
        self._written = 0  # sequence number of the last record written
        self._synced = 0  # ... and of the last one known to be on disk
        self._size = 0  # bytes written to the current file
        self._synced_size = 0  # ... and known to be on disk
        self._syncing = False
        self._failed: str | None = None
        self._futures: list[tuple[int, Future]] = []  # waiters for the syncing thread
        self._syncer: threading.Thread | None = None
        self._fd = self._open(generation)

    @property
    def failed(self) -> str | None:
        """Why the journal stopped accepting changes, or None."""
        return self._failed

    def _open(self, generation: int) -> int:
        fd = os.open(journal_path(self.folder, generation),
                     os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fsync_folder(self.folder)  # the new file's name must survive a crash too
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _fail(self, what: str, exc: OSError) -> JournalFailedError:
        if self._failed is None:
            self._failed = f"journal {what} failed ({exc.strerror or exc})"
            log.critical("%s; train and admin changes are refused until a restart",
                         self._failed)
            # An fsync under way covers records its waiters will be told are safe: let it
            # finish, then cut only what no fsync covered.
            while self._syncing:
                self._cond.wait()
            self._cut_unsafe()
        self._cond.notify_all()
        return JournalFailedError(self._refusal())

    def _refusal(self) -> str:
        return f"state changes are refused: {self._failed}; restart the server to recover"

    def _cut_unsafe(self) -> None:
        """Drop the records written since the last good fsync: none was acknowledged."""
        try:
            os.ftruncate(self._fd, self._synced_size)
            self._fsync(self._fd)
        except OSError as exc:
            log.critical("could not cut the unacknowledged records off %s (%s); a restart "
                         "may apply them", journal_path(self.folder, self.generation),
                         exc.strerror or exc)

    def check(self) -> None:
        """Raise ``JournalFailedError`` if the journal takes no more changes."""
        if self._failed:
            raise JournalFailedError(self._refusal())

    def append(self, frame: bytes) -> int:
        """Write one frame (not yet durable) and return its sequence number."""
        with self._cond:
            self.check()
            view = memoryview(frame)
            try:
                while view:
                    view = view[os.write(self._fd, view):]
            except OSError as exc:
                raise self._fail("write", exc) from None
            self._size += len(frame)
            self._written += 1
            return self._written

    def sync(self, seq: int) -> None:
        """Block until record ``seq`` is on disk; ``JournalFailedError`` if it cannot be."""
        with self._cond:
            while self._synced < seq:
                if self._failed:
                    raise JournalFailedError(self._refusal())
                if self._syncing:
                    self._cond.wait()
                    continue
                self._syncing = True
                target, size, fd = self._written, self._size, self._fd
                self._cond.release()
                try:
                    self._fsync(fd)
                    error = None
                except OSError as exc:
                    error = exc
                finally:
                    self._cond.acquire()
                    self._syncing = False
                if error is not None:
                    raise self._fail("fsync", error)
                self._synced = max(self._synced, target)
                self._synced_size = max(self._synced_size, size)
                self._cond.notify_all()

    def waiter(self, seq: int) -> Future:
        """A future settled once record ``seq`` is on disk (failed if it cannot be)."""
        future: Future = Future()
        with self._cond:
            if self._failed:
                future.set_exception(JournalFailedError(self._refusal()))
                return future
            self._futures.append((seq, future))
            if self._syncer is None:
                self._syncer = threading.Thread(target=self._settle_futures, daemon=True,
                                                name="normcore-journal-sync")
                self._syncer.start()
            self._cond.notify_all()
        return future

    def _settle_futures(self) -> None:
        """The syncing thread: fsync for the waiting futures, settle every one covered."""
        pacer = GroupPacer()
        while True:
            with self._cond:
                while not self._futures and self._failed is None:
                    self._cond.wait()
                if not self._futures:
                    return  # failed or closed, and no future left waiting
            pacer.wait()
            with self._cond:
                target = max(seq for seq, _ in self._futures)
            try:
                self.sync(target)
                error = None
            except JournalFailedError as exc:
                error = exc
            with self._cond:
                done = [(s, f) for s, f in self._futures if error or s <= self._synced]
                self._futures = [(s, f) for s, f in self._futures
                                 if not error and s > self._synced]
            pacer.wrote(len(done))
            for _, future in sorted(done, key=lambda item: item[0]):  # in record order
                if error is None:
                    future.set_result(None)
                else:
                    future.set_exception(JournalFailedError(str(error)))

    def rotate(self, generation: int) -> None:
        """Make everything written durable, then continue in a new file."""
        with self._cond:
            while self._syncing:
                self._cond.wait()
            if self._failed:
                raise JournalFailedError(self._refusal())
            try:
                self._fsync(self._fd)
                fd = self._open(generation)
            except OSError as exc:
                raise self._fail("fsync", exc) from None
            self._synced = self._written
            os.close(self._fd)
            self._fd, self.generation = fd, generation
            self._size = self._synced_size = 0
            self._cond.notify_all()

    def close(self) -> None:
        """Sync what was written and close the file (failures are logged, not raised)."""
        try:
            self.sync(self._written)
        except JournalFailedError as exc:
            log.error("closing the journal: %s", exc)
        with self._cond:
            while self._syncing:
                self._cond.wait()
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            if self._failed is None:
                self._failed = "the journal is closed"
            self._cond.notify_all()  # the syncing thread ends once no future is left


def replay(folder: Path, first: int) -> Iterator[tuple[int, bytes]]:
    """(generation, payload) of every good record in the journals from ``first`` on.

    A torn last record (a crash mid-append) is dropped with a warning; corruption anywhere
    else raises ``StateFileError`` naming the file.
    """
    generations = [g for g in journal_generations(folder) if g >= first]
    torn: Path | None = None
    for generation in generations:
        path = journal_path(folder, generation)
        data = path.read_bytes()
        payloads, end = read_frames(data, str(path))
        if torn is not None and payloads:
            raise StateFileError(f"{torn}: ends in a torn record, yet the later journal "
                                 f"{path.name} holds records; refusing to guess")
        if end < len(data):
            log.warning("%s: dropping a torn last record (%d bytes at byte %d): a crash "
                        "interrupted its write, so it was never acknowledged",
                        path, len(data) - end, end)
            torn = path
        for payload in payloads:
            yield generation, payload
