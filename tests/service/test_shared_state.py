"""State in PostgreSQL (``--state-url``), one replica: every change is committed before it is
acknowledged and restored exactly; replies carry the committed count; request_ids hold
across restarts. Against a real server started by the ``postgres`` fixture."""

from __future__ import annotations

import time
from collections.abc import Iterator

import psycopg
import pytest
import torch

from service.core.catalog import LayerSpec, load_catalog, make_layer
from service.state import changes
from service.state.shared import Postgres, SharedLog
from service.state.store import Store

from .conftest import make_client
from .test_persistence import _assert_same, _busy_day_changes

CPU = torch.device("cpu")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def specs() -> list[LayerSpec]:
    return load_catalog()


@pytest.fixture
def replicas(state_url: str, specs) -> Iterator:
    """open() -> a Store on the test's database (a replica); all closed at the end."""
    opened: list[Store] = []

    def open_replica(**options) -> Store:
        store = Store(CPU, log=SharedLog(Postgres(state_url), **options))
        store.load(specs)
        opened.append(store)
        return store

    yield open_replica
    for store in opened:
        store.close()


def test_train_steps_equal_torch_nn_and_survive_a_restart(replicas, specs) -> None:
    store = replicas()
    reference = torch.nn.BatchNorm1d(64, momentum=None)
    for i in range(6):
        x = torch.randn(8, 64) * (i + 1) + i
        outcome = store.train("stream.bn", x)
        expected = reference(x)
        assert outcome.num_batches_tracked == i + 1
        torch.testing.assert_close(outcome.output, expected, rtol=1e-5, atol=1e-5)
    layer = store.slot("stream.bn").layer
    torch.testing.assert_close(layer.running_mean, reference.running_mean)
    torch.testing.assert_close(layer.running_var, reference.running_var)
    again = replicas()
    _assert_same(store, again)
    assert store.persistence == again.persistence == "durable"


def test_every_kind_of_change_is_restored(replicas) -> None:
    store = replicas()
    _busy_day_changes(store)
    again = replicas()
    _assert_same(store, again)
    assert "features.gn" not in again
    assert again.slot("features.ln").spec.kind == "BatchNorm1d"
    again.reset("new.bn")
    assert torch.equal(again.slot("new.bn").layer.running_mean, torch.full((8,), 3.0))


def test_restore_from_a_snapshot_and_the_rows_after_it(replicas, state_url) -> None:
    store = replicas(snapshot_every=5)
    store.train("digits.bn1", torch.randn(4, 16, 3, 3), request_id="last")
    with psycopg.connect(state_url, autocommit=True) as conn:
        # Snapshots are written in the background, one at a time: step on until one is there.
        for _ in range(500):
            store.train("stream.bn", torch.randn(4, 64))
            snapshot = conn.execute("SELECT seq FROM normcore_snapshot").fetchone()
            if snapshot is not None and snapshot[0] >= 20:
                break
            time.sleep(0.005)
        first = conn.execute("SELECT min(seq) FROM normcore_log").fetchone()[0]
    assert first > 1  # rows before the previous snapshot were trimmed
    again = replicas()
    _assert_same(store, again)
    last = store.applied.get("last").num_batches_tracked
    assert again.applied.get("last").num_batches_tracked == last == int(
        store.slot("digits.bn1").layer.num_batches_tracked)


def test_retry_after_restart_is_answered_and_not_applied_again(replicas) -> None:
    store = replicas()
    x = torch.randn(8, 64)
    first = store.train("stream.bn", x, request_id="retry-me")
    store.train("stream.bn", torch.randn(8, 64))
    again = replicas()
    retry = again.train("stream.bn", x.clone(), request_id="retry-me")
    assert retry.num_batches_tracked == first.num_batches_tracked == 1
    assert torch.equal(retry.output, first.output)
    assert int(again.slot("stream.bn").layer.num_batches_tracked) == 2


def test_layers_without_running_statistics_record_only_their_keys(replicas) -> None:
    store = replicas()
    x = torch.randn(4, 64)
    first = store.train("features.ln", x, request_id="ln-1")
    assert first.num_batches_tracked is None
    again = replicas()
    assert again.applied.get("ln-1") is not None
    assert torch.equal(again.train("features.ln", x, request_id="ln-1").output, first.output)


def test_the_service_keeps_state_in_the_database(state_url: str) -> None:
    body = {"layer": "stream.bn", "mode": "train", "request_id": "once",
            "tensor": {"shape": [2, 64], "data": [0.5] * 64 + [1.5] * 64}}
    with make_client(state_url=state_url) as client:
        assert client.get("/readyz").json() == {"status": "ready", "layers": 9,
                                                "persistence": "durable"}
        first = client.post("/normalize", json=body)
        assert first.status_code == 200, first.text
        assert first.json()["num_batches_tracked"] == 1
        assert client.get("/stats").json()["server"]["persistence"] == "durable"
    with make_client(state_url=state_url) as client:
        assert client.post("/normalize", json=body).json() == first.json()
        assert client.get("/stats/stream.bn").json()["num_batches_tracked"] == 1


def test_a_state_url_and_a_state_dir_do_not_mix(tmp_path) -> None:
    from pydantic import ValidationError

    from service.settings import Settings

    with pytest.raises(ValidationError, match="choose one"):
        Settings(state_dir=tmp_path, state_url="postgresql://u@127.0.0.1/db")
    with pytest.raises(ValidationError, match="postgresql://"):
        Settings(state_url="mysql://u@127.0.0.1/db")
    assert "secret" not in repr(Settings(state_url="postgresql://u:secret@h/db"))


def test_a_put_layer_resets_to_its_upload_on_another_replica(replicas) -> None:
    store = replicas()
    new = make_layer("BatchNorm1d", {"num_features": 8})
    new.running_mean.fill_(3.0)
    state = {k: v.clone() for k, v in new.state_dict().items()}
    store.put(LayerSpec("new.bn", "BatchNorm1d", {"num_features": 8}, state=state), new)
    store.train("new.bn", torch.randn(5, 8))
    other = replicas()
    other.reset("new.bn")
    assert torch.equal(other.slot("new.bn").layer.running_mean, torch.full((8,), 3.0))


def test_readyz_says_the_database_is_awaited_at_start() -> None:
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings
    from tests.server_process import free_port

    url = f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere"  # nothing listens there
    app = create_app(Settings(state_url=url, threads=1, device="cpu"), load_in_background=True)
    with TestClient(app, raise_server_exceptions=False) as client:
        deadline = time.monotonic() + 10
        while "cannot be reached" not in (text := client.get("/readyz").text):
            assert time.monotonic() < deadline, text
            time.sleep(0.05)
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert "state database cannot be reached" in ready.json()["error"]
        assert client.get("/healthz").status_code == 200


def test_a_write_whose_reply_is_lost_is_settled_by_its_rows(replicas, monkeypatch) -> None:
    store = replicas()
    real, lost = Postgres.write, []

    def reply_lost(self, conn, origin, entries):
        result = real(self, conn, origin, entries)  # committed ...
        if not lost:
            lost.append(origin)
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return result  # ... but the reply never came

    monkeypatch.setattr(Postgres, "write", reply_lost)
    x = torch.randn(8, 64)
    assert store.train("stream.bn", x, request_id="lost").num_batches_tracked == 1
    assert lost
    assert store.train("stream.bn", x, request_id="lost").num_batches_tracked == 1
    assert int(store.slot("stream.bn").layer.num_batches_tracked) == 1


def test_a_write_that_fails_before_commit_is_refused_and_not_applied(replicas,
                                                                     monkeypatch) -> None:
    from service.state.shared import DatabaseUnavailableError

    store = replicas()

    def refused(self, conn, origin, entries):
        raise psycopg.OperationalError("connection refused")

    with monkeypatch.context() as patch:
        patch.setattr(Postgres, "write", refused)
        with pytest.raises(DatabaseUnavailableError, match="not applied"):
            store.train("stream.bn", torch.randn(8, 64), request_id="k")
    assert int(store.slot("stream.bn").layer.num_batches_tracked) == 0
    deadline = time.monotonic() + 5
    while store.persistence != "durable":  # the follower finds the database answering
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert store.train("stream.bn", torch.randn(8, 64), request_id="k").num_batches_tracked == 1


def test_a_put_layer_keeps_its_drift_threshold_on_every_replica(replicas, state_url) -> None:
    store = replicas(snapshot_every=3)
    new = make_layer("BatchNorm1d", {"num_features": 8})
    state = {k: v.clone() for k, v in new.state_dict().items()}
    store.put(LayerSpec("new.bn", "BatchNorm1d", {"num_features": 8}, state=state,
                        drift_threshold=0.7), new)
    assert replicas().slot("new.bn").spec.drift_threshold == 0.7  # folded from its log row
    with psycopg.connect(state_url, autocommit=True) as conn:
        for _ in range(500):
            store.train("new.bn", torch.randn(4, 8))
            if conn.execute("SELECT seq FROM normcore_snapshot").fetchone() is not None:
                break
            time.sleep(0.005)
        else:
            pytest.fail("no snapshot was written")
    assert replicas().slot("new.bn").spec.drift_threshold == 0.7  # restored from a snapshot


def test_a_step_that_can_start_at_once_is_taken_with_a_deadline_of_now(replicas) -> None:
    # The event loop takes small steps with a deadline of now: a step that waits for no lock
    # starts, and its future settles once committed.
    store = replicas()
    x = torch.randn(8, 64)
    outcome = store.start_train("stream.bn", x, deadline=time.monotonic()).result(timeout=10)
    assert outcome.num_batches_tracked == 1
    torch.testing.assert_close(outcome.output, torch.nn.BatchNorm1d(64)(x), rtol=1e-5,
                               atol=1e-5)


def test_groups_gather_only_under_concurrent_load(monkeypatch) -> None:
    slept = []
    monkeypatch.setattr(changes.time, "sleep", slept.append)
    pacer = changes.GroupPacer()
    pacer.wait()  # the first group goes at once
    pacer.wrote(1)
    pacer.wait()  # a lone client's next record too
    assert slept == []
    pacer.wrote(5)
    pacer.wait()  # several at once: the next group gathers until the window has passed
    assert len(slept) == 1
    assert 0 < slept[0] <= changes.GROUP_WINDOW
