"""The append-only journal: every applied change, fsynced before it is acknowledged.

Files are ``journal-<generation>.log`` in the state dir; each holds checksummed frames
(``records.py``). A change is queued under the caller's lock, so the file's order is the
order in which changes were applied, and written and made durable by ``sync``: the thread
that runs the fsync writes every queued frame first, in one call, so a request's own path
makes no system call (a write costs more than encoding the record).

Group commit: ``sync(seq)`` returns once some fsync that started after record ``seq`` was
appended has finished. One waiter at a time writes and fsyncs (the leader) and covers every
record appended before it started; the others wait, and whoever still needs more goes next.
While one fsync runs the next batch gathers, so throughput holds under concurrency while
each request still waits for exactly one or two fsyncs.

``waiter(seq)`` is the same wait as a future, settled by one syncing thread for a whole
group, so a request waiting for its record holds no thread. A waiter made on an event loop
joins the group of everything that loop records in the same turn: the syncing thread is
woken once per turn (and only from idle: while an fsync runs, the next group gathers), and
the group is settled on the loop in one call. Each wake-up of the syncing thread and each
callback it runs takes the interpreter lock from the loop, which costs more than a small
train step; once per group it is paid once for many requests. The group is not held open
any longer (as ``GroupPacer`` holds a database's): an fsync here costs less than a sleep's
extra wake-up.

A failed write or fsync is final. After a failed fsync the kernel may have dropped the
dirty pages and marked them clean, so a retry can "succeed" without the data ever reaching
the disk (PostgreSQL's fsyncgate, 2018). The journal refuses every later change and the
server must restart, recovering from what is on disk. The records that were not yet safe
were never acknowledged, so the file is cut back to the last synced byte (best effort: a
disk that fails the cut too may keep them), and a restart does not apply them after all.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path

from ..core.errors import UnavailableError
from .changes import AWAITED_ON_LOOP
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


def write_all(fd: int, data: bytes) -> int:
    """Write all of ``data`` at ``fd``'s position (``os.write`` may take only part); its
    length."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    return len(data)


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
        self._appended = 0  # sequence number of the last record appended
        self._synced = 0  # ... and of the last one known to be on disk
        self._queued: list[bytes] = []  # frames appended and not yet written, in order
        self._size = 0  # bytes written to the current file
        self._synced_size = 0  # ... and known to be on disk
        self._syncing = False
        self._failed: str | None = None
        # The next group commit's waiters, by the loop that settles them (None: this thread).
        self._groups: dict[asyncio.AbstractEventLoop | None, _Group] = {}
        self._idle = True  # the syncing thread sleeps until a waiter wakes it
        self._wake_on: asyncio.AbstractEventLoop | None = None  # a loop's turn ends first
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

    def _fail(self, what: str, exc: BaseException) -> JournalFailedError:
        """Refuse every change from now on (called with no fsync under way), and cut off
        what no fsync covered."""
        if self._failed is None:
            self._failed = f"journal {what} failed ({getattr(exc, 'strerror', None) or repr(exc)})"
            log.critical("%s; train and admin changes are refused until a restart",
                         self._failed)
            self._queued = []
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
        """Queue one frame (written and made durable by ``sync``); its sequence number."""
        with self._cond:
            self.check()
            self._queued.append(frame)
            self._appended += 1
            return self._appended

    def sync(self, seq: int) -> None:
        """Block until record ``seq`` is on disk; ``JournalFailedError`` if it cannot be."""
        with self._cond:
            while self._synced < seq:
                if self._failed:
                    raise JournalFailedError(self._refusal())
                if self._syncing:
                    self._cond.wait()
                    continue
                # The leader writes what is queued and fsyncs it, the lock released: records
                # appended meanwhile queue for the next leader, after these in the file.
                self._syncing = True
                target, frames, fd = self._appended, self._queued, self._fd
                self._queued = []
                self._cond.release()
                what, error, written = "write", None, 0
                try:
                    if frames:
                        written = write_all(fd, b"".join(frames))
                    what = "fsync"
                    self._fsync(fd)
                except BaseException as exc:  # (a MemoryError too: the frames are gone)
                    error = exc
                finally:
                    self._cond.acquire()
                    self._syncing = False
                    self._size += written
                if error is not None:
                    raise self._fail(what, error)
                self._synced = max(self._synced, target)
                self._synced_size = self._size
                self._cond.notify_all()

    def waiter(self, seq: int) -> Future:
        """A future settled once record ``seq`` (already appended) is on disk, failed if it
        cannot be.

        Every waiter of one group shares one future (it cannot be cancelled). Made while
        a caller on an event loop awaits it (``changes.AWAITED_ON_LOOP``), it is settled on
        that loop, and its group starts once the loop has run the callbacks that were
        ready (the rest of this turn's requests)."""
        loop = _running_loop() if AWAITED_ON_LOOP.get() else None
        with self._cond:
            if self._failed:
                return _settled_group(JournalFailedError(self._refusal()))
            if seq <= self._synced:
                return _settled_group(None)
            group = self._groups.get(loop)
            if group is None:
                group = self._groups[loop] = _Group()
            if self._syncer is None:
                self._syncer = threading.Thread(target=self._settle_groups, daemon=True,
                                                name="normcore-journal-sync")
                self._syncer.start()
            if not self._idle:
                pass  # the syncing thread takes it once the group under way is safe
            elif loop is None:
                self._wake()
            elif self._wake_on is not loop:  # once per turn (per loop: one may be closing)
                self._wake_on = loop
                loop.call_soon(self._wake)
        return group

    def _wake(self) -> None:
        with self._cond:
            self._idle, self._wake_on = False, None
            self._cond.notify_all()

    def _settle_groups(self) -> None:
        """The syncing thread: one fsync for every record with a waiter, then settle them.
        Under load the next group has gathered by the time the fsync ends, and is taken
        without anyone waking the thread."""
        while True:
            with self._cond:
                while self._failed is None:
                    if not self._groups:  # (a wake may find none: another took them)
                        self._idle = True
                    if not self._idle:
                        break
                    self._cond.wait()
                if not self._groups:
                    return  # failed or closed, and no waiter left
                # Every waiter's record was appended before it asked: this sync covers all.
                groups, self._groups = self._groups, {}
                target = self._appended
            try:
                self.sync(target)
                error = None
            except JournalFailedError as exc:
                error = exc
            for loop, group in groups.items():
                if loop is not None:
                    try:
                        loop.call_soon_threadsafe(group.settle, error)
                        continue
                    except RuntimeError:  # the loop is closed: nobody awaits there any more
                        pass
                group.settle(error)

    def rotate(self, generation: int) -> None:
        """Make everything appended durable, then continue in a new file."""
        with self._cond:
            while self._syncing:
                self._cond.wait()
            if self._failed:
                raise JournalFailedError(self._refusal())
            what = "write"
            try:
                self._size += write_all(self._fd, b"".join(self._queued))
                self._queued = []
                what = "fsync"
                self._fsync(self._fd)
                self._synced, self._synced_size = self._appended, self._size
                what = "open of the next file"  # (what is synced above stays safe)
                fd = self._open(generation)
            except OSError as exc:
                raise self._fail(what, exc) from None
            os.close(self._fd)
            self._fd, self.generation = fd, generation
            self._size = self._synced_size = 0
            self._cond.notify_all()

    def close(self) -> bool:
        """Sync what was appended and close the file; whether all of it is on disk
        (failures are logged, not raised)."""
        safe = True
        try:
            self.sync(self._appended)
        except JournalFailedError as exc:
            log.error("closing the journal: %s", exc)
            safe = False
        with self._cond:
            while self._syncing:
                self._cond.wait()
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            if self._failed is None:
                self._failed = "the journal is closed"
            self._cond.notify_all()  # the syncing thread ends once no waiter is left
        return safe


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:  # a worker thread
        return None


class _Group(Future):
    """The future that every waiter of one group commit shares."""

    def cancel(self) -> bool:
        return False  # one waiter may not cancel the others' wait

    def settle(self, error: JournalFailedError | None) -> None:
        if error is None:
            self.set_result(None)
        else:
            self.set_exception(JournalFailedError(str(error)))


def _settled_group(error: JournalFailedError | None) -> _Group:
    group = _Group()
    group.settle(error)
    return group


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
