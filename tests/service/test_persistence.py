"""The state dir under the store: restore after a crash or a stop, fsync failure, retries."""

from __future__ import annotations

import errno
import io
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors.torch
import torch

from service.app import create_app
from service.core.catalog import LayerSpec, load_catalog, make_layer
from service.core.engine import Engine
from service.settings import Settings
from service.state.journal import JournalFailedError, journal_generations
from service.state.persistence import Persistence
from service.state.records import StateFileError
from service.state.snapshot import snapshot_path
from service.state.store import Store

from .durable import CPU, open_store

with warnings.catch_warnings():  # starlette nudges towards httpx2, which is not installed
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient



@pytest.fixture(scope="module")
def specs() -> list[LayerSpec]:
    return load_catalog()


def _state(store: Store) -> dict[str, tuple[str, dict[str, torch.Tensor]]]:
    return {name: (slot.spec.kind, slot.layer.state_dict()) for name, slot in store}


def _assert_same(a: Store, b: Store) -> None:
    left, right = _state(a), _state(b)
    assert sorted(left) == sorted(right)
    for name, (kind, state) in left.items():
        assert right[name][0] == kind, name
        assert state.keys() == right[name][1].keys(), name
        for key, value in state.items():
            assert torch.equal(value, right[name][1][key]), f"{name}.{key}"


def _upload(layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in layer.state_dict().items()}


def _busy_day(store: Store, persistence: Persistence) -> None:
    """Every kind of change, with a compaction in the middle."""
    _busy_day_changes(store, persistence.compact)


def _busy_day_changes(store: Store, middle: Callable[[], None] = lambda: None) -> None:
    """Every kind of change, with ``middle`` called half-way."""
    for _ in range(3):
        store.train("stream.bn", torch.randn(8, 64))
        store.train("digits.bn1", torch.randn(4, 16, 3, 3), request_id=None)
        store.train("features.in", torch.randn(2, 16, 5))  # no buffers: nothing to record
    store.reset("digits.bn1")
    store.train("digits.bn1", torch.randn(4, 16, 3, 3))
    middle()
    new = make_layer("BatchNorm1d", {"num_features": 8})
    new.running_mean.fill_(3.0)
    store.put(LayerSpec("new.bn", "BatchNorm1d", {"num_features": 8}, state=_upload(new)), new)
    store.train("new.bn", torch.randn(5, 8), request_id="k-new")
    replaced = make_layer("BatchNorm1d", {"num_features": 4, "momentum": "cumulative"})
    store.put(LayerSpec("features.ln", "BatchNorm1d", {"num_features": 4,
                                                       "momentum": "cumulative"}), replaced)
    store.train("features.ln", torch.randn(3, 4))
    head = _upload(store.slot("digits.head.bn").layer)
    head["weight"] = torch.full_like(head["weight"], 2.0)
    head["running_var"] = torch.full_like(head["running_var"], 4.0)
    store.load_state("digits.head.bn", head)
    store.delete("features.gn")
    store.train("stream.bn", torch.randn(8, 64), request_id="k-last")


@pytest.mark.parametrize("restart", ["after a crash", "after a stop"])
def test_restart_restores_every_change_exactly(tmp_path: Path, specs, restart: str) -> None:
    store, persistence = open_store(tmp_path, specs)
    _busy_day(store, persistence)
    if restart == "after a stop":
        persistence.close()
    again, _ = open_store(tmp_path, specs)
    _assert_same(store, again)
    assert "features.gn" not in again
    assert again.slot("features.ln").spec.kind == "BatchNorm1d"
    assert again.applied.get("k-last") is not None


def test_state_dir_wins_over_the_checkpoint_and_reset_goes_back_to_it(tmp_path: Path,
                                                                      specs) -> None:
    store, _ = open_store(tmp_path, specs)
    checkpoint = store.slot("digits.head.bn").layer.running_mean.clone()
    store.train("digits.head.bn", torch.randn(16, 64))
    again, _ = open_store(tmp_path, specs)
    assert not torch.equal(again.slot("digits.head.bn").layer.running_mean, checkpoint)
    again.reset("digits.head.bn")
    third, _ = open_store(tmp_path, specs)
    assert torch.equal(third.slot("digits.head.bn").layer.running_mean, checkpoint)


def test_uploaded_layer_resets_to_its_upload_after_a_restart(tmp_path: Path, specs) -> None:
    store, persistence = open_store(tmp_path, specs)
    _busy_day(store, persistence)
    again, _ = open_store(tmp_path, specs)
    again.reset("new.bn")
    assert torch.equal(again.slot("new.bn").layer.running_mean, torch.full((8,), 3.0))
    assert int(again.slot("new.bn").layer.num_batches_tracked) == 0


def test_background_compaction_drops_the_journals_it_covers(tmp_path: Path, specs) -> None:
    store, persistence = open_store(tmp_path, specs, snapshot_every=5)
    for _ in range(23):
        store.train("stream.bn", torch.randn(4, 64))
    persistence.close()  # waits for a compaction under way
    assert journal_generations(tmp_path) == []
    again, _ = open_store(tmp_path, specs)
    _assert_same(store, again)


def test_torn_last_record_is_dropped_at_restore(tmp_path: Path, specs) -> None:
    store, persistence = open_store(tmp_path, specs)
    for _ in range(5):
        store.train("stream.bn", torch.randn(4, 64))
    (latest,) = tmp_path.glob("journal-*.log")
    with latest.open("ab") as f:
        f.write(latest.read_bytes()[:30])  # the start of a sixth record, cut short
    again, _ = open_store(tmp_path, specs)
    _assert_same(store, again)


def test_corrupt_snapshot_stops_restore_and_serves_nothing(tmp_path: Path, specs) -> None:
    _, persistence = open_store(tmp_path, specs)
    persistence.close()
    path = snapshot_path(tmp_path)
    data = bytearray(path.read_bytes())
    data[100] ^= 0x04
    path.write_bytes(bytes(data))
    store = Store(CPU, log=Persistence(tmp_path))
    with pytest.raises(StateFileError, match=str(path)):
        store.load(specs)
    assert len(store) == 0


class FailingFsync:
    """fdatasync that works ``good`` times, then fails once (and would work again)."""

    def __init__(self, good: int) -> None:
        self.good = good
        self.calls = 0

    def __call__(self, fd: int) -> None:
        self.calls += 1
        if self.calls == self.good + 1:
            raise OSError(errno.EIO, "Input/output error")


def test_failed_fsync_is_not_acknowledged_and_train_is_refused(tmp_path: Path, specs) -> None:
    fsync = FailingFsync(good=3)
    store, persistence = open_store(tmp_path, specs, fsync=fsync)
    for _ in range(3):
        store.train("stream.bn", torch.randn(4, 64))
    with pytest.raises(JournalFailedError, match="fsync failed"):
        store.train("stream.bn", torch.randn(4, 64))
    calls = fsync.calls
    with pytest.raises(JournalFailedError, match="refused"):
        store.train("stream.bn", torch.randn(4, 64))
    with pytest.raises(JournalFailedError):
        store.reset("stream.bn")
    assert fsync.calls == calls  # never retried
    store.evaluate("stream.bn", torch.randn(4, 64))  # reads still work
    # The refused step is not served: eval sees the three acknowledged ones ...
    assert int(store.slot("stream.bn").layer.num_batches_tracked) == 3
    assert persistence.status.startswith("failed: journal fsync failed")
    again, _ = open_store(tmp_path, specs)
    # ... and so does a restart: the record that was not safe was cut off the journal.
    assert int(again.slot("stream.bn").layer.num_batches_tracked) == 3


def test_failed_fsync_answers_503_and_stats_say_so(tmp_path: Path) -> None:
    app = create_app(Settings(state_dir=tmp_path),
                     change_log=Persistence(tmp_path, fsync=FailingFsync(good=1)))
    body = {"layer": "stream.bn", "mode": "train",
            "tensor": {"shape": [2, 64], "data": [0.5] * 64 + [1.5] * 64}}
    with TestClient(app) as client:
        assert client.get("/stats").json()["server"]["persistence"] == "durable"
        assert client.post("/normalize", json=body).status_code == 200
        failed = client.post("/normalize", json=body)
        assert failed.status_code == 503
        assert "fsync failed" in failed.json()["error"]
        refused = client.post("/normalize", json=body)
        assert refused.status_code == 503
        assert "refused" in refused.json()["error"]
        assert client.post("/normalize", json={**body, "mode": "eval"}).status_code == 200
        assert client.get("/stats").json()["server"]["persistence"].startswith("failed")


def test_memory_only_without_a_state_dir() -> None:
    with TestClient(create_app(Settings())) as client:
        assert client.get("/stats").json()["server"]["persistence"] == "memory"


def test_uploaded_state_does_not_touch_the_layer_being_served(specs) -> None:
    store = Store(CPU)
    store.load(specs)
    served = store.slot("digits.head.bn").layer
    weight = served.weight.clone()
    state = _upload(served)
    state["weight"] = state["weight"] + 1
    store.load_state("digits.head.bn", state)
    assert torch.equal(served.weight, weight)  # an eval still holding it sees no change
    assert torch.equal(store.slot("digits.head.bn").layer.weight, weight + 1)


def test_engine_put_layer_with_a_checkpoint_survives_restart(tmp_path: Path, specs) -> None:
    store, _ = open_store(tmp_path, specs)
    layer = make_layer("BatchNorm2d", {"num_features": 3})
    layer.running_mean.copy_(torch.tensor([1.0, 2.0, 3.0]))
    buffer = io.BytesIO(safetensors.torch.save({f"m.{k}": v for k, v in
                                                layer.state_dict().items()}))
    Engine(store).put_layer("up.bn", "BatchNorm2d", {"num_features": 3}, buffer.getvalue(),
                            prefix="m.")
    again, _ = open_store(tmp_path, specs)
    assert torch.equal(again.slot("up.bn").layer.running_mean, torch.tensor([1.0, 2.0, 3.0]))


def test_a_state_dir_serves_one_process_at_a_time(tmp_path: Path, specs) -> None:
    hold = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.lockf(fd, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()")
    with subprocess.Popen([sys.executable, "-c", hold, str(tmp_path / "lock")], text=True,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE) as holder:
        try:
            assert holder.stdout.readline().strip() == "held"
            with pytest.raises(StateFileError, match="in use by another server"):
                open_store(tmp_path, specs)
        finally:
            holder.kill()
    open_store(tmp_path, specs)  # the holder is gone, and so is its lock


def test_a_state_dir_that_cannot_be_written_serves_read_only_until_it_can(
        tmp_path: Path, specs, monkeypatch) -> None:
    from service.state import persistence as module

    full = threading.Event()
    full.set()
    real = module.write_snapshot

    def write_snapshot(folder, payload):
        if full.is_set():
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(folder, payload)

    monkeypatch.setattr(module, "write_snapshot", write_snapshot)
    monkeypatch.setattr(module, "READ_ONLY_RETRY_S", 0.05)
    store, persistence = open_store(tmp_path, specs)
    try:
        assert persistence.status.startswith("read-only: the state dir cannot be written")
        store.evaluate("stream.bn", torch.randn(4, 64))  # reads are served
        with pytest.raises(JournalFailedError, match="No space left"):
            store.train("stream.bn", torch.randn(4, 64))
        assert int(store.slot("stream.bn").layer.num_batches_tracked) == 0
        full.clear()  # space is back
        deadline = time.monotonic() + 5
        while persistence.status != "durable":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert store.train("stream.bn", torch.randn(4, 64)).num_batches_tracked == 1
    finally:
        persistence.close()
    again, _ = open_store(tmp_path, specs)
    assert int(again.slot("stream.bn").layer.num_batches_tracked) == 1


def test_a_step_is_served_once_safe_and_finishes_even_if_nobody_waits(tmp_path, specs) -> None:
    gate = threading.Event()
    store, _ = open_store(tmp_path, specs, fsync=lambda fd: gate.wait(10))
    reference = torch.nn.BatchNorm1d(64, momentum=None)
    x, y = torch.randn(8, 64), torch.randn(8, 64) + 1
    first = store.start_train("stream.bn", x, request_id="first")
    second = store.start_train("stream.bn", y)  # taken on top of the first, not yet safe
    assert not first.done()
    assert not second.done()
    served = store.slot("stream.bn").layer
    assert int(served.num_batches_tracked) == 0  # eval keeps the last safe layer
    second.cancel()  # a request that went away: its step still becomes safe and served
    gate.set()
    assert first.result(timeout=10).num_batches_tracked == 1
    reference(x), reference(y)
    layer = store.slot("stream.bn").layer
    deadline = time.monotonic() + 10
    while int(layer.num_batches_tracked) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
        layer = store.slot("stream.bn").layer
    torch.testing.assert_close(layer.running_mean, reference.running_mean)
    torch.testing.assert_close(layer.running_var, reference.running_var)
    assert store.applied.get("first").settled
    store.close()


def test_no_last_snapshot_holds_a_step_whose_record_failed_at_close(tmp_path, specs) -> None:
    in_fsync, release, failing = threading.Event(), threading.Event(), threading.Event()

    def fsync(fd: int) -> None:
        if failing.is_set():
            in_fsync.set()
            assert release.wait(10)
            raise OSError(errno.EIO, "Input/output error")

    store, persistence = open_store(tmp_path, specs, fsync=fsync)
    failing.set()
    step = store.start_train("stream.bn", torch.randn(8, 64))  # its record is not safe ...
    assert in_fsync.wait(10)
    closing = threading.Thread(target=persistence.close)
    closing.start()  # ... when the server stops
    time.sleep(0.05)
    release.set()
    closing.join(10)
    with pytest.raises(JournalFailedError):
        step.result(timeout=10)
    again, _ = open_store(tmp_path, specs)  # the refused step was never saved
    assert int(again.slot("stream.bn").layer.num_batches_tracked) == 0
