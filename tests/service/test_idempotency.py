"""Idempotency keys under the store: retries answered once, across restarts and concurrent
clients; conflicts; keys in flight; a bounded window."""

from __future__ import annotations

import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

from normcore.errors import InputError
from service.app import create_app
from service.core.catalog import LayerSpec, load_catalog
from service.settings import Settings
from service.state.idempotency import IdempotencyConflictError
from service.state.store import Store

from .durable import CPU, open_store

with warnings.catch_warnings():  # starlette nudges towards httpx2, which is not installed
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient



@pytest.fixture(scope="module")
def specs() -> list[LayerSpec]:
    return load_catalog()


def test_retry_after_restart_is_answered_and_not_applied_again(tmp_path: Path, specs) -> None:
    store, _ = open_store(tmp_path, specs)
    x = torch.randn(8, 64)
    first = store.train("stream.bn", x, request_id="retry-me")
    store.train("stream.bn", torch.randn(8, 64))
    again, _ = open_store(tmp_path, specs)
    before = again.slot("stream.bn").layer.state_dict()
    retry = again.train("stream.bn", x.clone(), request_id="retry-me")
    assert retry.num_batches_tracked == first.num_batches_tracked == 1
    assert torch.equal(retry.output, first.output)
    assert torch.equal(retry.stats["mean"], first.stats["mean"])
    for key, value in again.slot("stream.bn").layer.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_reused_key_with_another_tensor_or_layer_is_a_conflict(specs) -> None:
    store = Store(CPU)
    store.load(specs)
    x = torch.randn(4, 64)
    store.train("stream.bn", x, request_id="k")
    with pytest.raises(IdempotencyConflictError, match="different tensor"):
        store.train("stream.bn", x + 1, request_id="k")
    with pytest.raises(IdempotencyConflictError, match="stream.bn"):
        store.train("digits.head.bn", x, request_id="k")
    assert int(store.slot("stream.bn").layer.num_batches_tracked) == 1


def test_reused_key_answers_409() -> None:
    body = {"layer": "stream.bn", "mode": "train", "request_id": "once",
            "tensor": {"shape": [2, 64], "data": [0.5] * 64 + [1.5] * 64}}
    with TestClient(create_app(Settings())) as client:
        first = client.post("/normalize", json=body)
        assert client.post("/normalize", json=body).json() == first.json()
        body["tensor"]["data"][0] = 9.0
        conflict = client.post("/normalize", json=body)
        assert conflict.status_code == 409
        assert "request_id" in conflict.json()["error"]


def test_concurrent_retries_of_one_key_apply_once(tmp_path: Path, specs) -> None:
    store, _ = open_store(tmp_path, specs)
    x = torch.randn(8, 64)
    barrier = threading.Barrier(16)
    answers = []

    def client() -> None:
        barrier.wait()
        answers.append(store.train("stream.bn", x, request_id="same"))

    threads = [threading.Thread(target=client) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert [a.num_batches_tracked for a in answers] == [1] * 16
    assert all(torch.equal(a.output, answers[0].output) for a in answers)
    assert int(store.slot("stream.bn").layer.num_batches_tracked) == 1


def test_a_key_in_flight_survives_a_full_window(specs) -> None:
    store = Store(CPU, idempotency_window=2)
    store.load(specs)
    slot = store.slot("stream.bn")
    x = torch.randn(4, 64)
    attempts = [threading.Thread(target=store.train, args=("stream.bn", x, "k"), daemon=True)
                for _ in range(2)]
    slot.lock.acquire()  # the first attempt is in flight, waiting for the layer
    try:
        attempts[0].start()
        deadline = time.monotonic() + 10
        while store.applied.get("k") is None:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        for i in range(5):  # more keys than the window holds
            store.train("digits.head.bn", torch.randn(4, 64), request_id=f"other-{i}")
        in_flight = store.applied.get("k")
        attempts[1].start()  # the retry
        time.sleep(0.05)
    finally:
        slot.lock.release()
    for attempt in attempts:
        attempt.join(10)
    assert in_flight is not None
    assert int(store.slot("stream.bn").layer.num_batches_tracked) == 1


def test_refused_step_frees_its_key(specs) -> None:
    store = Store(CPU)
    store.load(specs)
    with pytest.raises(InputError, match="channels"):
        store.train("stream.bn", torch.randn(4, 3), request_id="k")
    assert store.train("stream.bn", torch.randn(4, 64), request_id="k").num_batches_tracked == 1


def test_key_window_is_bounded_across_restarts(tmp_path: Path, specs) -> None:
    store, persistence = open_store(tmp_path, specs, idempotency_window=3)
    for i in range(5):
        store.train("stream.bn", torch.randn(2, 64), request_id=f"k{i}")
    persistence.close()
    again, _ = open_store(tmp_path, specs, idempotency_window=3)
    assert [key for key, _ in again.applied] == ["k2", "k3", "k4"]



def test_a_reused_key_is_not_echoed_raw(specs) -> None:
    store = Store(CPU)
    store.load(specs)
    key = "<script>alert(1)</script>"
    store.train("stream.bn", torch.randn(4, 64), request_id=key)
    with pytest.raises(IdempotencyConflictError) as caught:
        store.train("stream.bn", torch.randn(4, 64), request_id=key)
    assert "<script>" not in str(caught.value)
