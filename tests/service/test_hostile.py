"""Hostile and unlucky requests against a real server process: each one is answered with a
small 4xx (or an honest 503) in bounded time, changes nothing it should not, and /healthz
keeps answering within 100 ms meanwhile."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import numpy as np
import pytest

from tests.server_process import ServerProcess, service_process

pytestmark = pytest.mark.slow

TOKEN = "hostile-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HEALTHZ_BUDGET = 0.1  # seconds, for 95% of the polls
HEALTHZ_WORST = 0.5  # seconds, for any one (a loaded 2-core machine preempts anyone)


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    env = {"NORMCORE_API_TOKEN": TOKEN, "NORMCORE_DEVICE": "cpu"}
    with service_process(env=env) as proc:
        yield proc


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, trust_env=False, timeout=60) as client:
        yield client


@contextmanager
def healthz_watch(server: ServerProcess) -> Iterator[list[float]]:
    """Polls /healthz on its own connection while the block runs; yields the latencies."""
    latencies: list[float] = []
    done = threading.Event()

    def poll() -> None:
        with httpx.Client(base_url=server.url, trust_env=False, timeout=10) as probe:
            probe.get("/healthz")  # connect before the clock runs
            while not done.is_set():
                start = time.perf_counter()
                assert probe.get("/healthz").status_code == 200
                latencies.append(time.perf_counter() - start)
                time.sleep(0.01)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    time.sleep(0.05)
    try:
        yield latencies
    finally:
        time.sleep(0.05)
        done.set()
        thread.join(10)


def assert_responsive(latencies: list[float]) -> None:
    assert latencies, "no /healthz poll finished"
    ordered = sorted(latencies)
    assert ordered[int(0.95 * (len(ordered) - 1))] < HEALTHZ_BUDGET, ordered[-5:]
    assert ordered[-1] < HEALTHZ_WORST, ordered[-5:]


def _v2_binary(shape: list[int], blob: bytes = b"", params: dict | None = None) -> tuple:
    header = json.dumps({"inputs": [{"name": "x", "shape": shape, "datatype": "FP32",
                                     "parameters": {"binary_data_size": len(blob)}}],
                         "parameters": params or {}}).encode()
    return header + blob, {"Inference-Header-Content-Length": str(len(header)),
                           "Content-Type": "application/octet-stream"}


def _count(http: httpx.Client, layer: str) -> int:
    return http.get(f"/stats/{layer}").json()["num_batches_tracked"]


# --- 1. outputs count against the limits ------------------------------------------------


@pytest.mark.parametrize(("layer", "shape"), [
    ("features.in", [1_000_000, 16, 0]), ("features.gn", [1_000_000, 32, 0]),
    ("features.ln", [10_000_000, 0, 64]),
])
def test_an_empty_input_cannot_ask_for_a_huge_reply(server, http, layer, shape) -> None:
    with healthz_watch(server) as latencies:
        start = time.perf_counter()
        reply = http.post("/normalize", json={"layer": layer,
                                              "tensor": {"shape": shape, "data": []}})
        elapsed = time.perf_counter() - start
    assert reply.status_code == 422
    assert "an empty tensor whose other dims span" in reply.json()["error"]
    assert len(reply.content) < 1000
    assert elapsed < 1.0
    assert_responsive(latencies)


@pytest.mark.parametrize("shape", [[1_000_000, 16, 0], [0, 2**63, 1, 1], [0, 2**40]])
def test_v2_binary_shapes_that_ask_for_huge_work_are_400(http, shape) -> None:
    body, headers = _v2_binary(shape)
    reply = http.post("/v2/models/features.in/infer", content=body, headers=headers)
    assert reply.status_code == 400
    assert len(reply.content) < 1000


# --- 2. compression bombs ---------------------------------------------------------------


def test_a_body_of_empty_gzip_members_is_refused_at_once(server, http) -> None:
    bomb = gzip.compress(b"") * 160_000  # 3.2 MB
    with healthz_watch(server) as latencies:
        start = time.perf_counter()
        reply = http.post("/v2/models/stream.bn/infer", content=bomb,
                          headers={"Content-Encoding": "gzip"})
        elapsed = time.perf_counter() - start
    assert reply.status_code == 400
    assert "gzip members" in reply.json()["error"]
    assert elapsed < 1.0
    assert_responsive(latencies)


def test_a_gzip_body_that_inflates_past_the_limit_is_413(http) -> None:
    bomb = gzip.compress(bytes(80 << 20), compresslevel=9)  # 80 MiB of zeros, ~80 KB
    reply = http.post("/v2/models/stream.bn/infer", content=bomb,
                      headers={"Content-Encoding": "gzip"})
    assert reply.status_code == 413


# --- 3. honest replies -----------------------------------------------------------------


def test_every_acknowledged_step_is_applied_and_no_refused_one_is(tmp_path) -> None:
    # Steps big enough for worker threads, with a journal, and a deadline of 2 ms to start:
    # those that meet another step on the layer are refused. Each reply must say the truth
    # about its step. How many meet depends on the machine's timing: rounds of 80 go on
    # until some were refused (rarely more than one).
    env = {"NORMCORE_REQUEST_TIMEOUT": "0.002", "NORMCORE_DEVICE": "cpu",
           "NORMCORE_STATE_DIR": str(tmp_path / "state")}
    with service_process(env=env) as proc, httpx.Client(base_url=proc.url, trust_env=False,
                                                        timeout=60) as http:
        body = {"layer": "stream.bn", "mode": "train",
                "tensor": {"shape": [300, 64], "data": np.ones(300 * 64).tolist()}}
        before = _count(http, "stream.bn")
        replies: list[httpx.Response] = []
        with ThreadPoolExecutor(80) as pool:
            for _ in range(10):
                replies += pool.map(lambda _: http.post("/normalize", json=body), range(80))
                if any(r.status_code == 503 for r in replies):
                    break
        statuses = [r.status_code for r in replies]
        assert set(statuses) == {200, 503}
        refused = [r.json()["error"] for r in replies if r.status_code == 503]
        assert all("nothing of it was applied" in message for message in refused)
        assert _count(http, "stream.bn") - before == statuses.count(200)
        proc.stop()
        proc.start()  # and after a restart, the same
        with httpx.Client(base_url=proc.url, trust_env=False, timeout=60) as again:
            assert _count(again, "stream.bn") - before == statuses.count(200)


# --- 4. nothing stalls the loop --------------------------------------------------------


def test_a_huge_layer_is_refused_before_it_is_built(server, http) -> None:
    with healthz_watch(server) as latencies:
        reply = http.put("/layers/big1", headers=AUTH,
                         json={"kind": "BatchNorm1d", "config": {"num_features": 16_777_216}})
    assert reply.status_code == 422
    assert "max_layer_features" in reply.json()["error"]
    assert http.get("/stats/big1").status_code == 404
    assert_responsive(latencies)


def test_stats_leave_out_the_vectors_of_wide_layers(http) -> None:
    reply = http.put("/layers/wide", headers=AUTH,
                     json={"kind": "BatchNorm1d", "config": {"num_features": 1 << 20}})
    assert reply.status_code == 200
    try:
        listing = http.get("/stats")
        assert listing.json()["layers"]["wide"]["summarized"] is True
        assert "running_mean" not in listing.json()["layers"]["wide"]
        assert len(listing.content) < 100_000
        assert len(http.get("/stats/wide").json()["running_mean"]) == 1 << 20
    finally:
        http.delete("/layers/wide", headers=AUTH)


def test_healthz_answers_while_a_big_json_body_is_served(server, http) -> None:
    values = np.random.default_rng(0).standard_normal(1 << 20).round(3)
    body = {"layer": "stream.bn", "tensor": {"shape": [(1 << 20) // 64, 64],
                                             "data": values.tolist()}}
    payload = json.dumps(body).encode()
    assert len(payload) < 16 << 20
    with healthz_watch(server) as latencies:
        reply = http.post("/normalize", content=payload,
                          headers={"Content-Type": "application/json"})
    assert reply.status_code == 200
    assert_responsive(latencies)


def test_healthz_answers_while_a_big_binary_body_is_served(server, http) -> None:
    x = np.random.default_rng(1).standard_normal((1 << 16, 64)).astype(np.float32)  # 16 MiB
    # A binary reply: as JSON, 4M values are more than a JSON reply may hold (413).
    body, headers = _v2_binary(list(x.shape), x.tobytes(), {"binary_data_output": True})
    with healthz_watch(server) as latencies:
        reply = http.post("/v2/models/stream.bn/infer", content=body, headers=headers)
    assert reply.status_code == 200
    assert_responsive(latencies)


def test_healthz_answers_while_big_json_bodies_arrive_at_once(server, http) -> None:
    # Four 15 MB bodies of zeros: each parse holds the GIL for a tenth of a second or more,
    # so they are parsed one after the other, not all at once.
    payload = b'{"layer": "stream.bn", "tensor": {"shape": [%d, 64], "data": [%s0]}}' % (
        (7 << 20) // 64, b"0," * ((7 << 20) - 1))
    with healthz_watch(server) as latencies, ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda _: http.post("/normalize", content=payload), range(4)))
    assert [r.status_code for r in replies] == [200] * 4
    assert_responsive(latencies)


def test_json_bodies_over_max_json_bytes_are_413(http) -> None:
    payload = b'{"layer": "stream.bn", "tensor": {"shape": [1], "data": [' + b"0," * (9 << 20)
    reply = http.post("/normalize", content=payload + b"0]}}",
                      headers={"Content-Type": "application/json"})
    assert reply.status_code == 413
    assert "max_json_bytes" in reply.json()["error"]


# --- 5. no leaks ------------------------------------------------------------------------


def test_with_reads_protected_metrics_and_bodies_wait_for_the_token() -> None:
    env = {"NORMCORE_API_TOKEN": TOKEN, "NORMCORE_PROTECT_READS": "true"}
    with service_process(env=env) as proc, httpx.Client(base_url=proc.url, trust_env=False,
                                                        timeout=30) as http:
        assert http.get("/metrics").status_code == 401
        assert "normcore_requests_total" in http.get("/metrics", headers=AUTH).text
        # Refused before the body is read: a stranger learns nothing from a parse error.
        assert http.post("/normalize", content=b"{not json").status_code == 401
        assert http.post("/v2/models/stream.bn/infer", content=b"\x00garbage").status_code == 401


def test_a_wrong_token_is_refused_before_the_body(http) -> None:
    reply = http.post("/normalize", content=b"{not json",
                      headers={"Authorization": "Bearer wrong"})
    assert reply.status_code == 403


def test_stats_show_checkpoint_paths_relative_to_the_catalog(http) -> None:
    entry = http.get("/stats/digits.bn1").json()
    assert entry["checkpoint"] == "digits_cnn.safetensors"


@pytest.mark.parametrize("name", ["<script>alert(1)</script>", "x" * 300])
def test_errors_do_not_echo_client_input(http, name) -> None:
    reply = http.post("/v2/models/stream.bn/infer",
                      json={"inputs": [{"name": name, "shape": [2, 64], "datatype": "XX",
                                        "data": [0.0] * 128}]})
    assert reply.status_code == 400
    assert name not in reply.text
    unknown = http.get(f"/v2/models/{name}")
    assert unknown.status_code in (404, 422)
    assert name not in unknown.text


# --- 6. no 500 for anything the client controls ------------------------------------------


@pytest.mark.parametrize("device", ["cuda:99999999999999999999", "cuda:-1", "tpu", "cpu\n"])
def test_impossible_devices_are_422(http, device) -> None:
    reply = http.put("/layers/odd", headers=AUTH, json={
        "kind": "BatchNorm1d", "config": {"num_features": 4}, "device": device})
    assert reply.status_code == 422
    assert http.get("/stats/odd").status_code == 404


# --- 7. a full disk at start-up ----------------------------------------------------------


@pytest.fixture
def full_disk(tmp_path) -> Iterator[tuple]:
    """A 1 MiB tmpfs filled to the last byte; yields (its folder, the file that fills it)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.decode()[:80]}")
    try:
        (disk / "state").mkdir()
        filler = disk / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:  # ENOSPC: full
            pass
        finally:
            os.close(fd)
        yield disk, filler
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_starts_read_only_and_recovers_by_itself(full_disk) -> None:
    disk, filler = full_disk
    env = {"NORMCORE_STATE_DIR": str(disk / "state"), "NORMCORE_DEVICE": "cpu"}
    with service_process(env=env) as proc, httpx.Client(base_url=proc.url, trust_env=False,
                                                        timeout=30) as http:
        assert http.get("/stats").json()["server"]["persistence"].startswith("read-only")
        body = {"layer": "stream.bn", "tensor": {"shape": [4, 64], "data": [1.0] * 256}}
        assert http.post("/normalize", json=body).status_code == 200
        refused = http.post("/normalize", json={**body, "mode": "train"})
        assert refused.status_code == 503
        assert "cannot be written" in refused.json()["error"]
        assert _count(http, "stream.bn") == 0
        filler.unlink()  # space is back: no restart needed
        deadline = time.monotonic() + 15
        while http.get("/stats").json()["server"]["persistence"] != "durable":
            assert time.monotonic() < deadline, "still read-only after space came back"
            time.sleep(0.2)
        assert http.post("/normalize", json={**body, "mode": "train"}).status_code == 200
        assert _count(http, "stream.bn") == 1


def test_a_disk_that_fills_while_training_refuses_and_keeps_what_it_acknowledged(
        full_disk) -> None:
    disk, filler = full_disk
    os.truncate(filler, filler.stat().st_size - (160 << 10))  # 160 KB left
    env = {"NORMCORE_STATE_DIR": str(disk / "state"), "NORMCORE_DEVICE": "cpu"}
    body = {"layer": "stream.bn", "mode": "train",
            "tensor": {"shape": [4, 64], "data": [1.0] * 256}}
    codes: list[int] = []
    with service_process(env=env) as proc, httpx.Client(base_url=proc.url, trust_env=False,
                                                        timeout=30) as http:
        assert http.get("/stats").json()["server"]["persistence"] == "durable"

        def client() -> None:
            with httpx.Client(base_url=proc.url, trust_env=False, timeout=30) as mine:
                while 503 not in codes:  # each record is about 600 bytes: full within 300
                    reply = mine.post("/normalize", json=body)
                    assert reply.status_code in (200, 503), reply.text
                    codes.append(reply.status_code)

        with ThreadPoolExecutor(4) as pool:
            for done in [pool.submit(client) for _ in range(4)]:
                done.result(timeout=60)
        assert codes.count(200) > 100  # it trained until the disk was full
        refused = http.post("/normalize", json=body)
        assert refused.status_code == 503
        assert "journal write failed" in refused.json()["error"]
        assert "No space left on device" in refused.json()["error"]
        assert _count(http, "stream.bn") == codes.count(200)  # none half-applied
        assert http.get("/healthz").status_code == 200
    with service_process(env=env) as proc, httpx.Client(base_url=proc.url, trust_env=False,
                                                        timeout=30) as http:
        assert _count(http, "stream.bn") == codes.count(200)  # every 200, and only those
