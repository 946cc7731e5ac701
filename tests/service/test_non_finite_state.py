"""Running statistics that would not be finite in the layer's own dtype: a float64 step on a
float32 layer whose statistics lie beyond float32's range is refused on every kind of
state, and where NaN/Inf are let in (allow_non_finite) the state that holds them restarts."""

from __future__ import annotations

import base64
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from normcore import NonFiniteError
from service.core.catalog import load_catalog
from service.state.shared import SharedLog, SQLite
from service.state.store import Store

from .conftest import make_client

CPU = torch.device("cpu")


def _float64_beyond_float32() -> torch.Tensor:
    # Each channel: 1e20 in one sample, -1e20 in the other. The variance, 1e40, is finite
    # in float64 and Inf in float32.
    x = torch.full((2, 16, 1, 1), 1e20, dtype=torch.float64)
    x[1] = -1e20
    return x


def _b64(x: torch.Tensor) -> dict:
    return {"shape": list(x.shape), "dtype": "float64",
            "b64": base64.b64encode(x.numpy().astype("<f8").tobytes()).decode()}


def test_a_float64_step_beyond_float32_is_refused_and_changes_nothing() -> None:
    with make_client() as client:
        before = client.get("/stats/digits.bn1").json()
        reply = client.post("/normalize", json={
            "layer": "digits.bn1", "mode": "train", "tensor": _b64(_float64_beyond_float32())})
        assert reply.status_code == 422, reply.text
        assert "overflow" in reply.json()["error"]
        after = client.get("/stats/digits.bn1").json()
        for key in ("running_mean", "running_var", "num_batches_tracked", "requests"):
            assert after[key] == before[key]
        assert after["rejected"] == before["rejected"] + 1
        # A float64 step within float32's range is taken.
        fine = client.post("/normalize", json={
            "layer": "digits.bn1", "mode": "train",
            "tensor": _b64(_float64_beyond_float32() * 1e-18)})
        assert fine.status_code == 200, fine.text


def test_a_float64_step_beyond_float32_is_refused_by_a_shared_log(tmp_path: Path) -> None:
    store = Store(CPU, log=SharedLog(SQLite(tmp_path / "state"), poll_s=0.1))
    try:
        store.load(load_catalog())
        layer = store.slot("digits.bn1").layer
        before = {k: v.clone() for k, v in layer.state_dict().items()}
        with pytest.raises(NonFiniteError, match="overflow"):
            store.train("digits.bn1", _float64_beyond_float32())
        after = store.slot("digits.bn1").layer.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
    finally:
        store.close()


def test_non_finite_steps_when_allowed_survive_a_restart(tmp_path: Path, caplog) -> None:
    x = np.random.default_rng(1).normal(size=(4, 16, 2, 2)).astype("<f4")
    x.flat[5] = np.nan
    tensor = {"shape": list(x.shape), "dtype": "float32",
              "b64": base64.b64encode(x.tobytes()).decode()}
    with make_client(allow_non_finite=True, state_dir=tmp_path) as client:
        reply = client.post("/normalize", json={
            "layer": "digits.bn1", "mode": "train", "tensor": tensor})
        assert reply.status_code == 200, reply.text
        served = client.get("/stats/digits.bn1").json()
    assert None in served["running_mean"]  # NaN, which JSON writes as null
    caplog.set_level(logging.WARNING, logger="normcore.service")
    with make_client(allow_non_finite=True, state_dir=tmp_path) as client:
        again = client.get("/stats/digits.bn1").json()
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        assert again[key] == served[key]
    assert "'digits.bn1' was restored with NaN or Inf" in caplog.text  # said, once
    assert caplog.text.count("restored with NaN or Inf") == 1
