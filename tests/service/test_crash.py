"""The real server under ``kill -9``: every acknowledged train update survives, nothing else.

Two clients stream train requests (each on its own layer, one request at a time, each with
a request_id) while the server is killed with SIGKILL at random moments and restarted on
the same state dir. After each restart the served statistics must equal an offline replay
of exactly the acknowledged requests. The one request per client that was in flight at the
kill may have been applied or not: the count says which, and a retry with its request_id
must then apply it exactly once.
"""

from __future__ import annotations

import base64
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import torch

from service.core.catalog import load_catalog
from tests.server_process import service_process

KILLS = 10
LAYERS = ("stream.bn", "digits.head.bn")  # cumulative momentum; momentum 0.1 from a checkpoint


def _tensor(x: torch.Tensor) -> dict:
    return {"shape": list(x.shape), "dtype": "float32",
            "b64": base64.b64encode(x.numpy().tobytes()).decode()}


@dataclass
class Stream:
    """One client: sequential train requests on one layer, and the offline replay of the
    ones the server acknowledged."""

    layer: str
    reference: torch.nn.Module
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(1))
    sent: int = 0
    acknowledged: int = 0
    in_flight: tuple[str, torch.Tensor] | None = None
    settled: dict[bool, int] = field(default_factory=lambda: {True: 0, False: 0})
    failure: str | None = None  # an answer other than 200 (threads cannot fail the test)
    # The journal stores the layer the step produced; a shared database stores what the step
    # adds, folded on each replica by torch ops where the reference ran the fused kernels.
    rtol: float = 1e-6

    def next_batch(self) -> tuple[str, torch.Tensor]:
        self.sent += 1
        x = torch.randn(8, 64, generator=self.generator) * 2 + 0.5
        return f"{self.layer}-{self.sent}", x

    def post(self, client: httpx.Client, key: str, x: torch.Tensor) -> httpx.Response:
        return client.post("/normalize", json={"layer": self.layer, "mode": "train",
                                               "request_id": key, "tensor": _tensor(x)})

    def apply(self, x: torch.Tensor) -> None:
        with torch.inference_mode():
            self.reference.normalize(x, train=True)
        self.acknowledged += 1

    def run(self, url: str, stop: threading.Event) -> None:
        with httpx.Client(base_url=url, timeout=10.0) as client:
            while not stop.is_set():
                key, x = self.in_flight = self.next_batch()
                try:
                    response = self.post(client, key, x)
                except httpx.TransportError:
                    return  # killed: this request stays in flight
                if response.status_code != 200:
                    self.failure = f"{response.status_code}: {response.text}"
                    return
                self.apply(x)
                self.in_flight = None

    def served(self, client: httpx.Client) -> dict:
        return client.get(f"/stats/{self.layer}").json()

    def check(self, client: httpx.Client) -> None:
        """Served state == offline replay; settle the request in flight at the kill."""
        served = self.served(client)
        count = int(self.reference.num_batches_tracked)
        if self.in_flight is not None:
            key, x = self.in_flight
            assert served["num_batches_tracked"] in (count, count + 1), (self.layer, served)
            applied = served["num_batches_tracked"] == count + 1
            self.settled[applied] += 1
            if applied:
                self.apply(x)
            self._compare(served)
            retry = self.post(client, key, x)  # the client's retry after the dropped reply
            assert retry.status_code == 200, retry.text
            assert retry.json()["num_batches_tracked"] == count + 1
            if not applied:
                self.apply(x)
            self.in_flight = None
            served = self.served(client)
        self._compare(served)

    def _compare(self, served: dict) -> None:
        ref = self.reference
        assert served["num_batches_tracked"] == int(ref.num_batches_tracked), self.layer
        for name in ("running_mean", "running_var"):
            torch.testing.assert_close(torch.tensor(served[name], dtype=torch.float32),
                                       getattr(ref, name), rtol=self.rtol, atol=self.rtol / 10)


def _streams() -> list[Stream]:
    specs = {spec.name: spec for spec in load_catalog()}
    return [Stream(name, specs[name].build(torch.device("cpu"))) for name in LAYERS]


@pytest.mark.slow
def test_acknowledged_updates_survive_sigkill(tmp_path: Path) -> None:
    rng = random.Random(7)
    streams = _streams()
    server = service_process(["--state-dir", str(tmp_path / "state")], log=tmp_path / "server.log",
                             env={"NORMCORE_SNAPSHOT_EVERY": "40"})  # compactions get killed too
    try:
        for _ in range(KILLS):
            server.start()
            with httpx.Client(base_url=server.url, timeout=10.0) as client:
                for stream in streams:
                    stream.check(client)
            stop = threading.Event()
            clients = [threading.Thread(target=s.run, args=(server.url, stop)) for s in streams]
            for thread in clients:
                thread.start()
            time.sleep(rng.uniform(0.05, 0.5))
            server.kill()
            stop.set()
            for thread in clients:
                thread.join(15)
            assert not any(s.failure for s in streams), [s.failure for s in streams]
        server.start()
        with httpx.Client(base_url=server.url, timeout=10.0) as client:
            for stream in streams:
                stream.check(client)
        assert server.stop() == 0
    finally:
        server.kill()
    acknowledged = sum(s.acknowledged for s in streams)
    assert acknowledged >= 10 * KILLS, "too few requests got through to test anything"
    applied = sum(s.settled[True] for s in streams)
    lost = sum(s.settled[False] for s in streams)
    print(f"{KILLS} kills survived; {acknowledged} updates checked; in flight at a kill: "
          f"{applied} applied, {lost} not applied (each retried once)")


def test_graceful_stop_saves_a_snapshot_and_exits_0(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (stream,) = _streams()[:1]
    server = service_process(["--state-dir", str(state)], log=tmp_path / "server.log")
    try:
        with httpx.Client(base_url=server.start().url, timeout=10.0) as client:
            for _ in range(5):
                key, x = stream.next_batch()
                assert stream.post(client, key, x).status_code == 200
                stream.apply(x)
        assert server.stop() == 0
        assert "state saved" in server.tail()
        # Everything is in the snapshot: the journal left behind holds no records.
        assert all(p.stat().st_size == 0 for p in state.glob("journal-*.log"))
        with httpx.Client(base_url=server.start().url, timeout=10.0) as client:
            stream.check(client)
    finally:
        server.kill()


def test_corrupt_snapshot_stops_start_up_naming_the_file(tmp_path: Path) -> None:
    state = tmp_path / "state"
    server = service_process(["--state-dir", str(state)], log=tmp_path / "server.log")
    try:
        server.start()
        assert server.stop() == 0
        snapshot = state / "snapshot.ncs"
        data = bytearray(snapshot.read_bytes())
        data[len(data) // 2] ^= 0xFF
        snapshot.write_bytes(bytes(data))
        with pytest.raises(RuntimeError, match="exited with 1"):
            server.start()
        assert f"{snapshot}: corrupt snapshot" in server.tail()
    finally:
        server.kill()
