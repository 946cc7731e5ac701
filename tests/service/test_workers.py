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


def test_workers_refuse_a_state_dir_that_holds_a_journal(tmp_path: Path) -> None:
    state = tmp_path / "state"
    one = service_process(["--state-dir", str(state)], log=tmp_path / "one.log")
    one.start()
    assert one.stop() == 0
    proc = _run("--workers", "2", "--port", "0", "--state-dir", str(state))
    assert proc.returncode != 0
    assert "holds the state of one server process" in proc.stderr
