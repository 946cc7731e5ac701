"""The image's entrypoint, run here as a local process: the Dockerfile's own CMD, ENV and
HEALTHCHECK (read from the file, not copied), with a temp state dir and a free port.

What cannot run here is the image build itself; everything the image runs at start can.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.client import encode_array

REPO = Path(__file__).resolve().parents[2]


def _runtime_stage() -> list[str]:
    """The Dockerfile's instructions after its last FROM, continuation lines joined."""
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    last_from = max(i for i, ln in enumerate(lines) if ln.upper().startswith("FROM "))
    return lines[last_from + 1:]


def _instruction(name: str) -> list[str]:
    return [ln[len(name) + 1:].strip() for ln in _runtime_stage()
            if ln.upper().startswith(name + " ")]


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in _instruction("ENV"):
        for pair in instruction.split():
            key, _, value = pair.partition("=")
            env[key] = value
    return env


def image_cmd() -> list[str]:
    (cmd,) = _instruction("CMD")
    return json.loads(cmd)


def image_healthcheck() -> list[str]:
    (check,) = _instruction("HEALTHCHECK")
    return json.loads(check[check.index("CMD") + 3:].strip())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ImageProcess:
    """The image's CMD with the image's environment, as a local process."""

    def __init__(self, state_dir: Path, log: Path) -> None:
        cmd = image_cmd()
        assert cmd[0] == "python"
        self.cmd = [sys.executable, *cmd[1:]]
        base = {k: v for k, v in os.environ.items() if not k.startswith("NORMCORE_")}
        self.env = {**base, **{k: v for k, v in image_env().items() if k != "PATH"}}
        self.port = _free_port()
        # Only the port (free here) and the state dir (a temp dir here) differ from the image.
        self.env.update(NORMCORE_PORT=str(self.port), NORMCORE_STATE_DIR=str(state_dir),
                        PYTHONPATH=str(REPO))
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> ImageProcess:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=self.env, stdout=out,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            if self.healthy():
                return self
            time.sleep(0.1)
        raise AssertionError(f"not ready in 60 s:\n{self.log.read_text()}")

    def healthy(self) -> bool:
        """The image's HEALTHCHECK command, run as the container engine would."""
        check = image_healthcheck()
        result = subprocess.run([sys.executable, *check[1:]], env=self.env, capture_output=True,
                                timeout=10, check=False)
        return result.returncode == 0

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # the image's STOPSIGNAL
        return self.proc.wait(30)


@pytest.fixture
def image(tmp_path: Path):
    proc = ImageProcess(tmp_path / "state", tmp_path / "server.log")
    yield proc
    if proc.proc is not None and proc.proc.poll() is None:
        proc.proc.kill()
        proc.proc.wait(10)


def test_dockerfile_runs_python_m_service_with_state_and_host_settings() -> None:
    assert image_cmd() == ["python", "-m", "service"]
    env = image_env()
    assert env["NORMCORE_HOST"] == "0.0.0.0"
    assert env["NORMCORE_STATE_DIR"] == "/var/lib/normcore"
    assert "NORMCORE_API_TOKEN" not in env
    assert _instruction("STOPSIGNAL") == ["SIGTERM"]


def test_image_entrypoint_becomes_ready_and_serves(image: ImageProcess) -> None:
    image.start()
    with httpx.Client(base_url=image.url, timeout=10) as client:
        assert client.get("/healthz").status_code == 200
        stats = client.get("/stats").json()
        assert stats["server"]["persistence"] == "durable"
        x = np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32)
        reply = client.post("/normalize", json={"layer": "features.ln",
                                                "tensor": encode_array(x)})
        assert reply.status_code == 200
    assert image.stop() == 0


def test_sigterm_during_train_stream_keeps_every_acknowledged_update(
    image: ImageProcess,
) -> None:
    image.start()
    acknowledged: list[int] = []
    stop = threading.Event()

    def stream() -> None:
        rng = np.random.default_rng(1)
        with httpx.Client(base_url=image.url, timeout=10) as client:
            while not stop.is_set():
                body = {"layer": "stream.bn", "mode": "train",
                        "tensor": encode_array(rng.normal(size=(8, 64)))}
                try:
                    reply = client.post("/normalize", json=body)
                except httpx.TransportError:
                    return  # the server is going away: this one was not acknowledged
                if reply.status_code == 200:
                    acknowledged.append(reply.json()["num_batches_tracked"])
                elif reply.status_code == 503:
                    return

    workers = [threading.Thread(target=stream) for _ in range(4)]
    for worker in workers:
        worker.start()
    time.sleep(1.0)
    assert image.stop() == 0, image.log.read_text()
    stop.set()
    for worker in workers:
        worker.join(15)
    assert len(acknowledged) > 10
    image.start()  # same state dir
    with httpx.Client(base_url=image.url, timeout=10) as client:
        count = client.get("/stats/stream.bn").json()["num_batches_tracked"]
    # Every acknowledged step is there, each once; a graceful stop answers every request it
    # applied, so nothing unacknowledged is there either.
    assert sorted(acknowledged) == list(range(1, len(acknowledged) + 1))
    assert count == len(acknowledged)
    assert image.stop() == 0
