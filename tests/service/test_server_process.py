"""The real server process on a real port, driven by the Python client and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch

from service.client import Client, ClientError
from tests.server_process import ROOT

from .reference import twin


def _twin(client: Client, name: str) -> torch.nn.Module:
    entry = client.stats(name)
    return twin(entry["kind"], entry["config"], client.download_state(name))


def test_eval_and_train_equal_torch_over_http(server) -> None:
    rng = np.random.default_rng(0)
    with Client(server.url) as client:
        reference = _twin(client, "digits.bn2")
        start = int(reference.num_batches_tracked)
        for step in range(5):
            x = rng.normal(0.5, 1.5, size=(8, 32, 4, 4)).astype(np.float32)
            result = client.normalize("digits.bn2", x, mode="train")
            with torch.no_grad():
                expected = reference.train()(torch.from_numpy(x)).numpy()
            np.testing.assert_allclose(result.output, expected, atol=1e-5)
            assert result.num_batches_tracked == start + step + 1
        entry = client.stats("digits.bn2")
        np.testing.assert_allclose(entry["running_mean"], reference.running_mean, atol=1e-6)
        np.testing.assert_allclose(entry["running_var"], reference.running_var, rtol=1e-5)
        x = rng.normal(size=(3, 32, 4, 4)).astype(np.float32)
        result = client.normalize("digits.bn2", x)
        with torch.no_grad():
            expected = reference.eval()(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(result.output, expected, atol=1e-5)
        np.testing.assert_allclose(result.stats["mean"], x.mean((0, 2, 3)), atol=1e-5)


def test_32_concurrent_train_requests_are_each_applied_once(server) -> None:
    rng = np.random.default_rng(1)
    batches = [rng.normal(i % 5, 1 + i % 3, size=(16, 64)).astype(np.float32)
               for i in range(32)]
    with Client(server.url) as client:
        initial = client.stats("stream.bn")
        before = initial["num_batches_tracked"]

        def send(x: np.ndarray) -> int:
            with Client(server.url) as own:
                return own.normalize("stream.bn", x, mode="train").num_batches_tracked

        with ThreadPoolExecutor(32) as pool:
            counts = list(pool.map(send, batches))
        entry = client.stats("stream.bn")
    assert entry["num_batches_tracked"] == before + 32
    assert sorted(counts) == list(range(before + 1, before + 33))
    # Cumulative momentum: the running mean is the plain average of every batch mean seen.
    total = np.asarray(initial["running_mean"]) * before + np.sum([b.mean(0) for b in batches], 0)
    np.testing.assert_allclose(entry["running_mean"], total / (before + 32), atol=1e-5)


def test_client_raises_with_the_servers_message(server) -> None:
    with Client(server.url) as client, pytest.raises(ClientError) as error:
        client.normalize("stream.bn", np.zeros((2, 63), np.float32), mode="train")
    assert error.value.status == 422
    assert "channels" in error.value.message


def test_cli_prints_stats(server) -> None:
    proc = subprocess.run([sys.executable, "-m", "service.cli", "--url", server.url, "stats",
                           "features.ln"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["kind"] == "LayerNorm"


def test_server_binds_loopback_by_default(server) -> None:
    assert httpx.get(f"{server.url}/healthz").status_code == 200
    assert "127.0.0.1" in server.log()
