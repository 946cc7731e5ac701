"""When the journal's disk fails: a failed write or fsync is final, refuses every later
change, and cuts off only what no fsync covered; and rotation with records still queued."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import pytest

from service.state.journal import Journal, JournalFailedError, journal_path
from service.state.records import frame, read_frames


def test_a_failed_fsync_fails_every_waiting_future(tmp_path: Path) -> None:
    def failing(fd: int) -> None:
        time.sleep(0.01)
        raise OSError(errno.EIO, "Input/output error")

    journal = Journal(tmp_path, 1, fsync=failing)
    futures = [journal.waiter(journal.append(frame(b"a"))) for _ in range(5)]
    for future in futures:
        with pytest.raises(JournalFailedError, match="fsync failed"):
            future.result(timeout=10)
    with pytest.raises(JournalFailedError):  # and no later record is taken
        journal.waiter(1).result(timeout=10)


def test_failed_fsync_refuses_this_and_every_later_record(tmp_path: Path) -> None:
    outcomes = iter([OSError(errno.EIO, "Input/output error")])

    def fsync(fd: int) -> None:
        failure = next(outcomes, None)  # fails once, would "succeed" afterwards
        if failure is not None:
            raise failure

    journal = Journal(tmp_path, 1, fsync=fsync)
    seq = journal.append(frame(b"a"))
    with pytest.raises(JournalFailedError, match="fsync failed"):
        journal.sync(seq)
    with pytest.raises(JournalFailedError, match="restart"):
        journal.sync(seq)  # no retry of the fsync
    with pytest.raises(JournalFailedError):
        journal.append(frame(b"b"))
    assert journal.failed is not None


def test_a_failed_write_cuts_only_what_no_fsync_covered(tmp_path: Path,
                                                                   monkeypatch) -> None:
    from service.state import journal as module

    in_fsync, release = threading.Event(), threading.Event()

    def blocking_fsync(fd: int) -> None:
        in_fsync.set()
        assert release.wait(10)

    class FullDisk:
        """``os`` with a write that fails once the disk is full."""

        full = False

        def __getattr__(self, name):
            return getattr(os, name)

        def write(self, fd, data):
            if self.full:
                raise OSError(errno.ENOSPC, "No space left on device")
            return os.write(fd, data)

    fake = FullDisk()
    monkeypatch.setattr(module, "os", fake)
    journal = Journal(tmp_path, 1, fsync=blocking_fsync)
    record = frame(b"acknowledged")
    seq = journal.append(record)
    acknowledged = []
    leader = threading.Thread(target=lambda: acknowledged.append(journal.sync(seq) is None))
    leader.start()
    assert in_fsync.wait(10)  # the fsync that covers the record is under way ...
    fake.full = True
    later = journal.append(frame(b"x"))  # queued: written by the next sync ...
    refused = []

    def next_sync() -> None:
        try:
            journal.sync(later)
        except JournalFailedError as exc:
            refused.append(str(exc))

    failed = threading.Thread(target=next_sync)
    failed.start()  # ... whose write fails once the fsync under way is done
    time.sleep(0.05)
    release.set()
    leader.join(10)
    failed.join(10)
    assert acknowledged == [True]
    assert len(refused) == 1
    assert "journal write failed" in refused[0]
    with pytest.raises(JournalFailedError):
        journal.append(frame(b"y"))  # and every later change is refused
    payloads, _ = read_frames(journal_path(tmp_path, 1).read_bytes(), "journal")
    assert payloads == [b"acknowledged"]  # still there: it was acknowledged


def test_rotate_writes_the_queued_records_into_the_old_file(tmp_path: Path) -> None:
    journal = Journal(tmp_path, 1)
    seqs = [journal.append(frame(payload)) for payload in (b"a", b"b")]
    journal.rotate(2)
    journal.sync(seqs[-1])  # safe already: no write, no fsync needed
    assert read_frames(journal_path(tmp_path, 1).read_bytes(), "old")[0] == [b"a", b"b"]
    journal.sync(journal.append(frame(b"c")))
    assert read_frames(journal_path(tmp_path, 2).read_bytes(), "new")[0] == [b"c"]
    journal.close()


def test_a_write_that_fails_in_rotate_is_final(tmp_path: Path, monkeypatch) -> None:
    from service.state import journal as module

    journal = Journal(tmp_path, 1)
    journal.sync(journal.append(frame(b"safe")))
    journal.append(frame(b"queued"))

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(module.os, "write", full)
    with pytest.raises(JournalFailedError, match="journal write failed"):
        journal.rotate(2)
    monkeypatch.undo()
    with pytest.raises(JournalFailedError):
        journal.append(frame(b"later"))
    assert read_frames(journal_path(tmp_path, 1).read_bytes(), "journal")[0] == [b"safe"]


def test_any_error_in_the_leaders_write_fails_the_journal_and_its_waiters(
        tmp_path: Path, monkeypatch) -> None:
    """Not only OSError: the queued frames left the queue, so nothing may call them safe."""
    journal = Journal(tmp_path, 1)
    journal.sync(journal.append(frame(b"safe")))
    lost = journal.append(frame(b"lost"))

    from service.state import journal as module

    def no_memory(fd, data):
        raise MemoryError

    monkeypatch.setattr(module, "write_all", no_memory)
    waiter = journal.waiter(lost)
    with pytest.raises(JournalFailedError, match="journal write failed"):
        waiter.result(timeout=10)
    with pytest.raises(JournalFailedError):
        journal.sync(lost)
    with pytest.raises(JournalFailedError):
        journal.append(frame(b"later"))
    assert journal.close() is False
    assert read_frames(journal_path(tmp_path, 1).read_bytes(), "journal")[0] == [b"safe"]


def test_a_rotate_that_cannot_open_the_next_file_keeps_what_it_synced(tmp_path: Path,
                                                                      monkeypatch) -> None:
    from service.state import journal as module

    journal = Journal(tmp_path, 1)
    seq = journal.append(frame(b"synced by the rotate"))

    def no_file(folder: Path) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(module, "fsync_folder", no_file)  # the new file's name cannot be kept
    with pytest.raises(JournalFailedError, match="journal open of the next file failed"):
        journal.rotate(2)
    journal.sync(seq)  # its record was fsynced before the failure: safe, not cut
    with pytest.raises(JournalFailedError):
        journal.append(frame(b"later"))
    payloads, _ = read_frames(journal_path(tmp_path, 1).read_bytes(), "journal")
    assert payloads == [b"synced by the rotate"]
