"""GET /models/{prefix} and /models/{prefix}/state: a catalog model's layers and its state
keyed by module path, with read access; the CLI's export-model; a client without torch."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

import safetensors.torch
import torch

from service import cli
from service.core.catalog import default_catalog

from .conftest import make_client

ROOT = Path(__file__).resolve().parents[2]
DIGITS = {"features.1": "digits.bn1", "features.4": "digits.bn2", "features.8": "digits.bn3",
          "head.2": "digits.head.bn"}
TOKEN = "models-token-0123456789"


def test_a_model_lists_its_layers_by_module_path(client) -> None:
    reply = client.get("/models/digits.")
    assert reply.status_code == 200
    assert reply.json() == {"name_prefix": "digits.", "layers": DIGITS}


def test_model_state_is_the_checkpoint_keyed_by_module_path(client) -> None:
    reply = client.get("/models/digits./state")
    assert reply.status_code == 200
    assert reply.headers["content-type"] == "application/octet-stream"
    state = safetensors.torch.load(reply.content)
    checkpoint = safetensors.torch.load_file(default_catalog().parent / "digits_cnn.safetensors")
    expected = {k for k in checkpoint if k.startswith(tuple(f"{m}." for m in DIGITS))}
    assert set(state) == expected
    for key in expected:
        assert torch.equal(state[key], checkpoint[key]), key


def test_model_state_follows_train_steps(client) -> None:
    x = torch.randn(16, 64)
    body = {"layer": "digits.head.bn", "mode": "train", "tensor": {
        "shape": [16, 64], "dtype": "float32",
        "b64": base64.b64encode(x.numpy().tobytes()).decode()}}
    assert client.post("/normalize", json=body).status_code == 200
    state = safetensors.torch.load(client.get("/models/digits./state").content)
    stats = client.get("/stats/digits.head.bn").json()
    assert int(state["head.2.num_batches_tracked"]) == stats["num_batches_tracked"]
    assert state["head.2.running_mean"].tolist() == torch.tensor(
        stats["running_mean"], dtype=torch.float32).tolist()


def test_unknown_models_and_deleted_layers_are_404(client) -> None:
    reply = client.get("/models/nothing./state")
    assert reply.status_code == 404
    assert "unknown model 'nothing.'" in reply.json()["error"]
    assert client.get("/models/nothing.").status_code == 404
    assert client.delete("/layers/digits.bn2").status_code == 200
    reply = client.get("/models/digits./state")
    assert reply.status_code == 404
    assert "digits.bn2" in reply.json()["error"]


def test_model_state_needs_read_access_only() -> None:
    with make_client(api_token=TOKEN) as open_reads:
        assert open_reads.get("/models/digits./state").status_code == 200
    with make_client(api_token=TOKEN, protect_reads=True) as protected:
        assert protected.get("/models/digits./state").status_code == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert protected.get("/models/digits./state", headers=auth).status_code == 200


def test_the_models_routes_are_documented(client) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/models/{prefix}", "/models/{prefix}/state"):
        assert set(paths[path]["get"]["responses"]) >= {"200", "401", "403", "404", "422"}


def test_cli_exports_a_model(server_url: str, tmp_path: Path, capsys) -> None:
    out = tmp_path / "digits.safetensors"
    assert cli.main(["--url", server_url, "export-model", "digits.", str(out)]) == 0
    assert "written" in capsys.readouterr().out
    assert "features.1.running_mean" in safetensors.torch.load_file(out)


def test_the_client_imports_without_torch() -> None:
    script = ("import sys; sys.modules['torch'] = None\n"
              "import service.client\n"
              "assert 'torch' not in {m.split('.')[0] for m in sys.modules if sys.modules[m]}\n")
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True, timeout=60)
