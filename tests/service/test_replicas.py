"""Two replicas on one database (PostgreSQL, or SQLite for --workers) hold one state: each
applies every committed change in commit order, so both equal one torch.nn layer taking the
same steps in that order; a step shows on the other replica within a second; a request_id
is applied once whichever replica it is sent to."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import torch

from service.core.catalog import LayerSpec, load_catalog, make_layer
from service.state.idempotency import IdempotencyConflictError
from service.state.shared import Postgres, SharedLog, SQLite
from service.state.store import Store
from tests.server_process import service_process

from .reference import twin_of
from .test_crash import _tensor
from .test_persistence import _assert_same

CPU = torch.device("cpu")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def specs() -> list[LayerSpec]:
    return load_catalog()


@pytest.fixture(params=["postgresql", "sqlite"])
def pair(request, specs, tmp_path) -> Iterator[tuple[Store, Store]]:
    """Two replicas of one state: on PostgreSQL, or on SQLite in a state dir (--workers)."""
    if request.param == "postgresql":
        url = request.getfixturevalue("state_url")
        db = lambda: Postgres(url)  # noqa: E731
    else:
        db = lambda: SQLite(tmp_path / "state")  # noqa: E731
    stores = []
    for _ in range(2):
        store = Store(CPU, log=SharedLog(db(), poll_s=0.1))
        store.load(specs)
        stores.append(store)
    yield tuple(stores)
    for store in stores:
        store.close()


def _count(store: Store, name: str) -> int:
    return int(store.slot(name).layer.num_batches_tracked)


def _until(check, timeout: float = 5.0) -> float:
    """Seconds until ``check()`` holds (AssertionError after ``timeout``)."""
    start = time.perf_counter()
    while not check():
        if time.perf_counter() - start > timeout:
            raise AssertionError(f"not within {timeout} s")
        time.sleep(0.002)
    return time.perf_counter() - start


def test_alternating_steps_equal_torch_nn_serial(pair, specs) -> None:
    a, b = pair
    reference = {s.name: s for s in specs}["digits.head.bn"].build(CPU)  # momentum 0.1
    twin = torch.nn.BatchNorm1d(64)
    twin.load_state_dict(reference.state_dict())
    start = int(twin.num_batches_tracked)
    for i in range(10):
        x = torch.randn(16, 64) * 3 + i
        outcome = (a, b)[i % 2].train("digits.head.bn", x)
        torch.testing.assert_close(outcome.output, twin.train()(x), rtol=1e-5, atol=1e-5)
        assert outcome.num_batches_tracked == start + i + 1
    _until(lambda: _count(a, "digits.head.bn") == _count(b, "digits.head.bn") == start + 10)
    for store in (a, b):
        layer = store.slot("digits.head.bn").layer
        torch.testing.assert_close(layer.running_mean, twin.running_mean)
        torch.testing.assert_close(layer.running_var, twin.running_var)
    _assert_same(a, b)


def test_concurrent_steps_over_two_replicas_equal_the_offline_average(pair) -> None:
    a, b = pair
    batches = [torch.randn(8, 64) * (1 + i % 5) + i for i in range(64)]
    counts: list[int] = []
    barrier = threading.Barrier(16)

    def client(k: int) -> None:
        barrier.wait()
        for i in range(k, 64, 16):
            counts.append((a, b)[i % 2].train("stream.bn", batches[i]).num_batches_tracked)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(counts) == list(range(1, 65))  # every committed count once
    _until(lambda: _count(a, "stream.bn") == _count(b, "stream.bn") == 64)
    means = torch.stack([x.mean(0) for x in batches])
    variances = torch.stack([x.var(0, unbiased=True) for x in batches])
    for store in (a, b):
        layer = store.slot("stream.bn").layer
        torch.testing.assert_close(layer.running_mean, means.mean(0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.running_var, variances.mean(0), rtol=1e-5, atol=1e-5)
    _assert_same(a, b)


def test_a_step_shows_on_the_other_replica_within_a_second(pair) -> None:
    a, b = pair
    delays = []
    for i in range(20):
        a.train("stream.bn", torch.randn(4, 64))
        delays.append(_until(lambda i=i: _count(b, "stream.bn") == i + 1, timeout=1.0))
    print(f"visibility: median {statistics.median(delays) * 1e3:.1f} ms, "
          f"worst {max(delays) * 1e3:.1f} ms")
    assert max(delays) < 1.0


def test_a_request_id_is_applied_once_across_replicas(pair) -> None:
    a, b = pair
    x = torch.randn(8, 64)
    first = a.train("stream.bn", x, request_id="k")
    retry = b.train("stream.bn", x.clone(), request_id="k")  # before or after b saw it
    assert retry.num_batches_tracked == first.num_batches_tracked == 1
    assert torch.equal(retry.output, first.output)
    with pytest.raises(IdempotencyConflictError, match="different tensor"):
        b.train("stream.bn", x + 1, request_id="k")
    _until(lambda: _count(a, "stream.bn") == _count(b, "stream.bn") == 1)


def test_concurrent_retries_on_both_replicas_apply_once(pair) -> None:
    a, b = pair
    x = torch.randn(8, 64)
    barrier = threading.Barrier(8)
    answers = []

    def client(store: Store) -> None:
        barrier.wait()
        answers.append(store.train("stream.bn", x, request_id="same").num_batches_tracked)

    threads = [threading.Thread(target=client, args=((a, b)[i % 2],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert answers == [1] * 8
    time.sleep(0.3)
    assert _count(a, "stream.bn") == _count(b, "stream.bn") == 1


def test_admin_changes_reach_the_other_replica(pair) -> None:
    a, b = pair
    new = make_layer("BatchNorm1d", {"num_features": 8})
    new.running_mean.fill_(3.0)
    a.put(LayerSpec("new.bn", "BatchNorm1d", {"num_features": 8}, state=new.state_dict()), new)
    _until(lambda: "new.bn" in b, timeout=1.0)
    b.train("new.bn", torch.randn(5, 8))
    a.delete("features.gn")
    head = {k: v.clone() for k, v in a.slot("digits.head.bn").layer.state_dict().items()}
    head["running_var"] = torch.full_like(head["running_var"], 4.0)
    b.load_state("digits.head.bn", head)
    b.train("digits.bn1", torch.randn(4, 16, 3, 3))
    a.reset("digits.bn1")
    _until(lambda: "features.gn" not in b and _count(b, "digits.bn1") == _count(a, "digits.bn1")
           and _count(a, "new.bn") == 1)
    _assert_same(a, b)
    assert torch.equal(b.slot("digits.head.bn").layer.running_var, torch.full((64,), 4.0))


def test_two_server_processes_serve_one_state(state_url: str, tmp_path) -> None:
    env = {"NORMCORE_STATE_URL": state_url, "NORMCORE_DEVICE": "cpu"}
    servers = [service_process(env=env, log=tmp_path / f"replica-{i}.log") for i in range(2)]
    twin = torch.nn.BatchNorm1d(64, momentum=None)
    try:
        clients = [httpx.Client(base_url=s.start().url, timeout=30) for s in servers]
        for i in range(8):
            x = torch.randn(8, 64) + i
            reply = clients[i % 2].post("/normalize", json={
                "layer": "stream.bn", "mode": "train", "tensor": _tensor(x)})
            assert reply.status_code == 200, reply.text
            assert reply.json()["num_batches_tracked"] == i + 1
            twin.train()(x)
        for client in clients:
            _until(lambda c=client: c.get("/stats/stream.bn").json()["num_batches_tracked"]
                   == 8)
            served = twin_of(client, "stream.bn")
            torch.testing.assert_close(served.running_mean, twin.running_mean)
            torch.testing.assert_close(served.running_var, twin.running_var)
        for client in clients:
            client.close()
    finally:
        for server in servers:
            server.stop()
