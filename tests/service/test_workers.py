"""``--workers N``: server processes on one port sharing one state (the embedded default:
SQLite in the state dir; PostgreSQL with --state-url). Memory-only state is refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from tests.server_process import ROOT, service_process

from .test_crash import _tensor

pytestmark = pytest.mark.slow


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _train(url: str, x: torch.Tensor, key: str) -> dict:
    # A connection per request: the kernel hands each one to either worker.
    with httpx.Client(base_url=url, timeout=30) as client:
        reply = client.post("/normalize", json={"layer": "stream.bn", "mode": "train",
                                                "request_id": key, "tensor": _tensor(x)})
    assert reply.status_code == 200, reply.text
    return reply.json()


def _stats(url: str) -> dict:
    with httpx.Client(base_url=url, timeout=30) as client:
        return client.get("/stats/stream.bn").json()


def _served_everywhere(url: str, count: int, timeout: float = 5.0) -> dict:
    """The stats once 10 fresh connections in a row (spread over the workers) agree."""
    deadline = time.monotonic() + timeout
    while True:
        seen = [_stats(url) for _ in range(10)]
        if all(s["num_batches_tracked"] == count for s in seen):
            return seen[-1]
        assert time.monotonic() < deadline, [s["num_batches_tracked"] for s in seen]
        time.sleep(0.05)


@pytest.mark.parametrize("backend", ["state-dir", "state-url"])
def test_two_workers_share_one_state(backend: str, tmp_path: Path, request) -> None:
    args = ["--workers", "2", "--device", "cpu"]
    if backend == "state-dir":
        args += ["--state-dir", str(tmp_path / "state")]
    else:
        args += ["--state-url", request.getfixturevalue("state_url")]
    server = service_process(args, log=tmp_path / "server.log")
    twin = torch.nn.BatchNorm1d(64, momentum=None)
    try:
        server.start()
        assert len(_children(server.pid)) == 2
        for i in range(30):
            x = torch.randn(8, 64) + i
            assert _train(server.url, x, f"k{i}")["num_batches_tracked"] == i + 1
            twin.train()(x)
        served = _served_everywhere(server.url, 30)
        torch.testing.assert_close(torch.tensor(served["running_mean"]), twin.running_mean)
        torch.testing.assert_close(torch.tensor(served["running_var"]), twin.running_var)
        # A retry reaches whichever worker: answered, not applied again.
        assert _train(server.url, x, "k29")["num_batches_tracked"] == 30

        # kill -9 of one worker: the parent starts another, which catches up.
        victim = _children(server.pid)[0]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while victim in _children(server.pid) or len(_children(server.pid)) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        while server.log(1 << 20).count("serving 9 layers") < 3:  # the new one is ready
            assert time.monotonic() < deadline
            time.sleep(0.1)
        for i in range(30, 40):
            x = torch.randn(8, 64) + i
            assert _train(server.url, x, f"k{i}")["num_batches_tracked"] == i + 1
            twin(x)
        served = _served_everywhere(server.url, 40, timeout=30)
        torch.testing.assert_close(torch.tensor(served["running_mean"]), twin.running_mean)
        assert server.stop() == 0
    finally:
        server.kill()


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("NORMCORE_")}
    full |= {"PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "service", *args], capture_output=True,
                          text=True, env=full, timeout=120, cwd=ROOT)


def test_workers_with_memory_only_state_are_refused() -> None:
    proc = _run("--workers", "2", "--port", "0")
    assert proc.returncode == 2
    assert "workers above 1 need a shared state" in proc.stderr


def test_workers_adopt_the_state_one_process_kept(tmp_path: Path) -> None:
    state = tmp_path / "state"
    one = service_process(["--state-dir", str(state), "--device", "cpu"],
                          log=tmp_path / "one.log")
    twin = torch.nn.BatchNorm1d(64, momentum=None)
    try:
        one.start()
        for i in range(5):
            x = torch.randn(8, 64) + i
            assert _train(one.url, x, f"k{i}")["num_batches_tracked"] == i + 1
            twin.train()(x)
        with httpx.Client(base_url=one.url, timeout=30) as client:
            put = client.put("/layers/new.bn", json={"kind": "BatchNorm1d",
                                                     "config": {"num_features": 8}})
            assert put.status_code == 200, put.text
            assert client.delete("/layers/features.gn").status_code == 200
        assert one.stop() == 0
    finally:
        one.kill()

    workers = service_process(["--workers", "2", "--state-dir", str(state), "--device",
                               "cpu"], log=tmp_path / "workers.log")
    try:
        workers.start()
        served = _served_everywhere(workers.url, 5)
        torch.testing.assert_close(torch.tensor(served["running_mean"]), twin.running_mean)
        torch.testing.assert_close(torch.tensor(served["running_var"]), twin.running_var)
        assert _train(workers.url, x, "k4")["num_batches_tracked"] == 5  # a retry: not again
        for _ in range(6):  # fresh connections reach either worker
            with httpx.Client(base_url=workers.url, timeout=30) as client:
                assert client.get("/stats/new.bn").status_code == 200
                assert client.get("/stats/features.gn").status_code == 404
        assert _train(workers.url, x + 1, "k5")["num_batches_tracked"] == 6
        assert workers.stop() == 0
    finally:
        workers.kill()
    assert (state / "shared.db").exists()
    assert (state / "journal-adopted" / "snapshot.ncs").exists()
    assert not (state / "snapshot.ncs").exists()


def test_the_adoption_check_names_the_files_the_state_modules_write() -> None:
    from service.state import adopt, snapshot
    from service.state.shared import SQLITE_FILE

    assert (adopt._SNAPSHOT, adopt._SHARED) == (snapshot.SNAPSHOT, SQLITE_FILE)
