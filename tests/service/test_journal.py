"""The journal's file format, torn-record detection, group commit and fsync failure."""

from __future__ import annotations

import asyncio
import errno
import os
import re
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch

from service.state.changes import AWAITED_ON_LOOP
from service.state.journal import Journal, JournalFailedError, journal_path, replay
from service.state.records import StateFileError, decode_record, encode_record, frame, read_frames
from service.state.snapshot import read_snapshot, snapshot_path, write_snapshot


def _records(n: int) -> list[bytes]:
    return [encode_record({"op": "train", "layer": f"l{i}"}, {"running_mean": torch.randn(4)})
            for i in range(n)]


def _journal_file(folder: Path, payloads: list[bytes]) -> Path:
    journal = Journal(folder, 1)
    for payload in payloads:
        journal.sync(journal.append(frame(payload)))
    journal.close()
    return journal_path(folder, 1)


def test_records_round_trip_every_dtype() -> None:
    tensors = {"f32": torch.randn(3, 2), "bf16": torch.randn(5).bfloat16(),
               "count": torch.tensor(7), "empty": torch.empty(0, 3),
               "strided": torch.randn(4, 6).t(), "bf16_strided": torch.randn(3, 4).bfloat16().t(),
               "bf16_scalar": torch.tensor(1.5, dtype=torch.bfloat16),
               "f16": torch.randn(2, 3).half(), "f64": torch.randn(3).double()}
    meta, back = decode_record(encode_record({"op": "x", "n": [1, 2]}, tensors), "test")
    assert meta == {"op": "x", "n": [1, 2]}
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype
        assert torch.equal(back[name], tensor)


def test_replay_returns_every_record_in_order(tmp_path: Path) -> None:
    payloads = _records(5)
    _journal_file(tmp_path, payloads)
    assert [p for _, p in replay(tmp_path, 0)] == payloads


@pytest.mark.parametrize("cut", [1, 5, 11, 12, 40, -1])
def test_torn_last_record_is_dropped_and_nothing_earlier(tmp_path: Path, cut: int) -> None:
    payloads = _records(4)
    path = _journal_file(tmp_path, payloads[:3])
    torn = frame(payloads[3])
    with path.open("ab") as f:
        f.write(torn[:cut])  # a crash part-way through writing the fourth record
    assert [p for _, p in replay(tmp_path, 0)] == payloads[:3]


def test_torn_record_of_zeros_is_dropped(tmp_path: Path) -> None:
    # A crash can leave the file longer with the new bytes still zero.
    path = _journal_file(tmp_path, _records(2))
    with path.open("ab") as f:
        f.write(bytes(100))
    assert len(list(replay(tmp_path, 0))) == 2


def test_corrupt_middle_record_is_an_error_naming_the_file(tmp_path: Path) -> None:
    payloads = _records(4)
    path = _journal_file(tmp_path, payloads)
    data = bytearray(path.read_bytes())
    second = len(frame(payloads[0])) + 20  # inside the second record
    data[second] ^= 0x01
    path.write_bytes(bytes(data))
    where = re.escape(str(path))
    with pytest.raises(StateFileError, match=rf"{where}: record at byte \d+ is corrupt"):
        list(replay(tmp_path, 0))


def test_torn_journal_followed_by_a_later_one_is_an_error(tmp_path: Path) -> None:
    path = _journal_file(tmp_path, _records(2))
    with path.open("ab") as f:
        f.write(frame(_records(1)[0])[:9])
    later = Journal(tmp_path, 2)
    later.sync(later.append(frame(_records(1)[0])))
    later.close()
    with pytest.raises(StateFileError, match="torn record"):
        list(replay(tmp_path, 0))


def test_read_frames_reports_where_the_good_part_ends() -> None:
    good = frame(b"one") + frame(b"two")
    payloads, end = read_frames(good + b"NCR1\x00", "mem")
    assert payloads == [b"one", b"two"]
    assert end == len(good)


def test_group_commit_covers_concurrent_records_with_few_fsyncs(tmp_path: Path) -> None:
    synced = []  # for each finished fsync, the file's length when it started

    def slow_fsync(fd: int) -> None:
        size = os.fstat(fd).st_size  # what this fsync makes durable
        time.sleep(0.01)
        synced.append(size)

    journal = Journal(tmp_path, 1, fsync=slow_fsync)
    record = frame(b"x" * 50)
    barrier = threading.Barrier(32)
    uncovered = []

    def client() -> None:
        barrier.wait()
        seq = journal.append(record)
        journal.sync(seq)
        # Acknowledged only once an fsync that started after this record was written
        # (the file at least ``seq`` records long) has finished.
        if not any(size >= seq * len(record) for size in synced):
            uncovered.append(seq)

    threads = [threading.Thread(target=client) for _ in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert uncovered == []
    assert max(synced, default=0) == 32 * len(record)
    assert len(synced) < 16  # one fsync per record would be 32


def test_waiters_settle_after_a_covering_fsync_without_a_thread_each(tmp_path: Path) -> None:
    synced = []  # for each finished fsync, the file's length when it started
    gate = threading.Event()

    def gated_fsync(fd: int) -> None:
        size = os.fstat(fd).st_size
        gate.wait(10)
        time.sleep(0.005)
        synced.append(size)

    journal = Journal(tmp_path, 1, fsync=gated_fsync)
    record = frame(b"x" * 50)
    uncovered, settled = [], []

    def check(seq: int, future) -> None:  # runs in the thread that settles the future
        future.result()
        settled.append(seq)
        if not any(size >= seq * len(record) for size in synced):
            uncovered.append(seq)

    threads_before = threading.active_count()
    futures = []
    for _ in range(32):
        seq = journal.append(record)
        future = journal.waiter(seq)
        future.add_done_callback(lambda f, seq=seq: check(seq, f))
        futures.append(future)
    assert not any(f.done() for f in futures)  # the first fsync is held at the gate
    assert threading.active_count() <= threads_before + 1  # one syncing thread, for all
    gate.set()
    for future in futures:
        future.result(timeout=10)
    assert uncovered == []
    assert sorted(settled) == list(range(1, 33))
    assert len(synced) <= 3  # one fsync under way at the gate, then the rest as one group
    journal.close()


def _awaited_on_loop(journal: Journal, records: int, pause: float = 0.0) -> list[Future]:
    """Waiters for ``records`` new records, made as ``Engine.start_train`` makes them, with
    ``pause`` seconds between them in which another thread may run."""
    token = AWAITED_ON_LOOP.set(True)
    waiters = []
    try:
        for _ in range(records):
            waiters.append(journal.waiter(journal.append(frame(b"x" * 50))))
            time.sleep(pause)
        return waiters
    finally:
        AWAITED_ON_LOOP.reset(token)


def test_waiters_awaited_on_a_loop_share_one_fsync_and_settle_on_that_loop(
        tmp_path: Path) -> None:
    fsyncs = []

    def counted(fd: int) -> None:
        fsyncs.append(fd)
        os.fdatasync(fd)

    journal = Journal(tmp_path, 1, fsync=counted)
    settled_in: list[int] = []

    async def one_turn() -> int:
        waiters = _awaited_on_loop(journal, 8, pause=0.005)
        for waiter in waiters:
            waiter.add_done_callback(lambda _: settled_in.append(threading.get_ident()))
        await asyncio.gather(*(asyncio.wrap_future(w) for w in waiters))
        return threading.get_ident()

    loop_thread = asyncio.run(one_turn())
    assert settled_in == [loop_thread] * 8
    assert len(fsyncs) == 1  # the syncing thread waited for the end of the loop's turn
    journal.close()


def test_a_wake_that_finds_no_group_leaves_the_syncing_thread_serving(tmp_path: Path) -> None:
    journal = Journal(tmp_path, 1)

    async def turns() -> None:
        first = _awaited_on_loop(journal, 1)  # the loop will wake the thread after this turn
        # ... but a worker thread's record wakes it at once, and it takes both groups
        journal.waiter(journal.append(frame(b"from a thread"))).result(timeout=10)
        await asyncio.wait_for(asyncio.wrap_future(first[0]), 10)  # the loop's wake: no group
        later = _awaited_on_loop(journal, 1)
        await asyncio.wait_for(asyncio.wrap_future(later[0]), 10)

    asyncio.run(turns())
    journal.close()


def test_a_group_cannot_be_cancelled_by_one_of_its_waiters(tmp_path: Path) -> None:
    journal = Journal(tmp_path, 1)
    first, second = (journal.waiter(journal.append(frame(b"a"))) for _ in range(2))
    first.cancel()
    second.result(timeout=10)
    assert not first.cancelled()
    journal.close()


def test_a_failed_fsync_fails_waiters_awaited_on_a_loop(tmp_path: Path) -> None:
    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    journal = Journal(tmp_path, 1, fsync=failing)

    async def one_turn() -> list:
        waiters = _awaited_on_loop(journal, 3)
        return await asyncio.gather(*(asyncio.wrap_future(w) for w in waiters),
                                    return_exceptions=True)

    for outcome in asyncio.run(one_turn()):
        assert isinstance(outcome, JournalFailedError)
        assert "fsync failed" in str(outcome)


def test_snapshot_round_trips_and_leaves_no_temp_file(tmp_path: Path) -> None:
    write_snapshot(tmp_path, b"first")
    write_snapshot(tmp_path, b"second")
    assert read_snapshot(tmp_path) == b"second"
    assert [p.name for p in tmp_path.iterdir()] == ["snapshot.ncs"]


def test_missing_snapshot_is_none(tmp_path: Path) -> None:
    assert read_snapshot(tmp_path) is None


@pytest.mark.parametrize("damage", ["flip", "truncate", "append"])
def test_corrupt_snapshot_is_an_error_naming_the_file(tmp_path: Path, damage: str) -> None:
    write_snapshot(tmp_path, encode_record({"format": 1}, {"t": torch.randn(16)}))
    path = snapshot_path(tmp_path)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-5] ^= 0x10
    elif damage == "truncate":
        del data[-3:]
    else:
        data += frame(b"extra")
    path.write_bytes(bytes(data))
    with pytest.raises(StateFileError, match=re.escape(str(path))) as info:
        read_snapshot(tmp_path)
    assert "corrupt snapshot" in str(info.value)
    with pytest.raises(StateFileError, match="never replaced by defaults"):
        read_snapshot(tmp_path)
