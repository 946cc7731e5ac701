"""The image's entrypoint, run here as a local process: the Dockerfile's own CMD, ENV and
HEALTHCHECK (read from the file, not copied), with a temp state dir and a free port.

What cannot run here is the image build itself; everything the image runs at start can.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from normcore import kernels
from normcore.kernels import _loader
from service.client import encode_array
from tests.server_process import ServerProcess, free_port

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


def healthy(server: ServerProcess) -> bool:
    """The image's HEALTHCHECK command, run as the container engine would."""
    check = image_healthcheck()
    result = subprocess.run([sys.executable, *check[1:]], env=server.env, capture_output=True,
                            timeout=10, check=False)
    return result.returncode == 0


@pytest.fixture
def image(tmp_path: Path) -> Iterator[ServerProcess]:
    """The image's CMD with the image's environment, as a local process; ready when the
    image's HEALTHCHECK passes."""
    cmd = image_cmd()
    assert cmd[0] == "python"
    env = {k: v for k, v in image_env().items() if k != "PATH"}
    # Only the ports (free here), the state dir (a temp dir here) and the kernels differ from
    # the image: the image carries a build made when it was built, here it is this machine's
    # own, made now, so that the server loads it rather than compiling inside its timeout.
    assert env.pop("TORCH_EXTENSIONS_DIR") == "/opt/normcore-kernels"
    kernels.warm_up()
    env.update(NORMCORE_PORT="{port}", NORMCORE_GRPC_PORT=str(free_port()),
               NORMCORE_STATE_DIR=str(tmp_path / "state"), PYTHONPATH=str(REPO),
               TORCH_EXTENSIONS_DIR=str(_loader.build_directory().parent))
    server = ServerProcess([sys.executable, *cmd[1:]], env=env, ready=healthy,
                           log=tmp_path / "server.log", cwd=REPO, name="the image's CMD")
    yield server
    server.kill()


def test_dockerfile_runs_python_m_service_with_state_and_host_settings() -> None:
    assert image_cmd() == ["python", "-m", "service"]
    env = image_env()
    assert env["NORMCORE_HOST"] == "0.0.0.0"
    assert env["NORMCORE_STATE_DIR"] == "/var/lib/normcore"
    assert "NORMCORE_API_TOKEN" not in env
    assert _instruction("STOPSIGNAL") == ["SIGTERM"]


def test_image_entrypoint_becomes_ready_and_serves(image: ServerProcess) -> None:
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
    image: ServerProcess,
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
    assert image.stop() == 0, image.log()
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
