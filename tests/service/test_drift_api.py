"""Where the drift score shows, in-process: /normalize eval replies, /stats, V2, /metrics;
the per-layer drift_threshold from the catalog and PUT /layers; batching and odd inputs."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from service.app import create_app
from service.core.catalog import CatalogError, load_catalog
from service.settings import Settings

from .conftest import make_client
from .reference import tensor

SHAPES = {
    "digits.bn1": (6, 16, 4, 4), "digits.head.bn": (32, 64), "stream.bn": (32, 64),
    "features.ln": (16, 64), "features.rms": (16, 64), "features.gn": (8, 32, 5),
    "features.in": (8, 16, 6),
}


def _x(name: str, seed: int = 0, shift: float = 0.0, scale: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(0, 1, SHAPES[name]) * scale + shift).astype(np.float32)


def _eval(client, name: str, x: np.ndarray) -> dict:
    reply = client.post("/normalize", json={"layer": name, "tensor": tensor(x)})
    assert reply.status_code == 200, reply.text
    return reply.json()


def _kl_score(x: np.ndarray, mean: np.ndarray, var: np.ndarray, eps: float) -> float:
    """The drift of a BatchNorm batch in float64, from the definition of KL."""
    dims = tuple(d for d in range(x.ndim) if d != 1)
    m1 = x.astype(np.float64).mean(dims)
    v1 = x.astype(np.float64).var(dims, ddof=1) + eps
    v2 = var.astype(np.float64) + eps

    def kl(ma, va, mb, vb):
        return 0.5 * (np.log(vb / va) + (va + (ma - mb) ** 2) / vb - 1)

    return float((kl(m1, v1, mean, v2) + kl(mean, v2, m1, v1)).mean())


# --- /normalize -------------------------------------------------------------------------


def test_batchnorm_eval_scores_against_the_running_statistics(client) -> None:
    x = _x("digits.bn1", shift=0.3)
    body = _eval(client, "digits.bn1", x)
    stats = client.get("/stats/digits.bn1").json()
    expected = _kl_score(x, np.array(stats["running_mean"]), np.array(stats["running_var"]),
                         stats["config"]["eps"])
    assert body["drift"]["score"] == pytest.approx(expected, rel=1e-4)
    channels = body["drift"]["channels"]
    assert len(channels) == 3
    assert [c["score"] for c in channels] == sorted((c["score"] for c in channels), reverse=True)


@pytest.mark.parametrize("name", SHAPES)
def test_every_kind_gets_a_score_in_eval_and_none_in_train(client, name: str) -> None:
    first = _eval(client, name, _x(name, 1))
    second = _eval(client, name, _x(name, 2))
    running = client.get(f"/stats/{name}").json()["drift"]["reference"] == "running"
    # Without running statistics, the first batch starts the reference.
    assert (first["drift"]["score"] is not None) == running
    assert second["drift"]["score"] >= 0
    assert all(c["channel"] >= 0 for c in second["drift"]["channels"])
    if name != "features.in":  # no running statistics to train
        body = {"layer": name, "mode": "train", "tensor": tensor(_x(name, 3))}
        trained = client.post("/normalize", json=body).json()
        assert "drift" not in trained


def test_layernorm_reference_follows_the_inputs_and_flags_a_shift(client) -> None:
    for seed in range(12):
        body = _eval(client, "features.ln", _x("features.ln", seed))
    calm = body["drift"]["score"]
    assert calm < 0.5  # 16 rows: about 2/16 and a bit
    shifted = _eval(client, "features.ln", _x("features.ln", 99, shift=1.0))
    assert shifted["drift"]["score"] > 0.9 + calm
    entry = client.get("/stats/features.ln").json()["drift"]
    assert entry["reference"] == "inputs"
    assert entry["reference_batches"] == 13
    assert len(entry["reference_mean"]) == len(entry["reference_var"]) == 64
    assert entry["scored"] == 12
    assert entry["max"] == pytest.approx(shifted["drift"]["score"])


def test_non_finite_inputs_get_no_score_and_leave_the_reference_alone(client) -> None:
    engine = client.app.state.engine
    x = torch.from_numpy(_x("features.ln", 5))
    engine.normalize("features.ln", x, "eval")
    before = engine.layer_info("features.ln").drift.reference_mean
    bad = x.clone()
    bad[0, 3] = math.nan
    assert engine.normalize("features.ln", bad, "eval").drift.score is None
    assert engine.normalize("stream.bn", torch.full((4, 64), math.inf), "eval").drift.score \
        is None
    torch.testing.assert_close(engine.layer_info("features.ln").drift.reference_mean, before)
    assert engine.normalize("features.ln", x, "eval").drift.score is not None


def test_float64_and_single_sample_inputs(client) -> None:
    x = _x("stream.bn", 4)
    as_f64 = {"shape": list(x.shape), "dtype": "float64", "data": x.astype(float).tolist()}
    f64 = client.post("/normalize", json={"layer": "stream.bn", "tensor": as_f64}).json()
    f32 = _eval(client, "stream.bn", x)
    assert f64["drift"]["score"] == pytest.approx(f32["drift"]["score"], rel=1e-4)
    one = _eval(client, "stream.bn", x[:1])  # one value per channel: no variance
    assert one["drift"] == {"score": None, "channels": []}


def test_merged_eval_requests_get_the_drift_they_would_get_alone() -> None:
    inputs = [torch.from_numpy(_x("features.ln", seed)[: 4 + seed]) for seed in range(6)]
    inputs += [torch.from_numpy(_x("stream.bn", seed)[: 4 + seed]) for seed in range(6)]

    async def outcomes(batch: int):
        app = create_app(Settings(threads=1, device="cpu", batch_max_size=batch,
                                  batch_max_delay_ms=50))
        async with app.router.lifespan_context(app):
            engine = app.state.engine
            names = ["features.ln"] * 6 + ["stream.bn"] * 6
            if app.state.batcher is None:
                return [engine.normalize(n, x, "eval") for n, x in zip(names, inputs,
                                                                        strict=True)]
            return await asyncio.gather(*(app.state.batcher.evaluate(n, x)
                                          for n, x in zip(names, inputs, strict=True)))

    alone, merged = asyncio.run(outcomes(0)), asyncio.run(outcomes(8))
    for a, m in zip(alone, merged, strict=True):
        assert (a.drift.score is None) == (m.drift.score is None)
        if a.drift.score is not None:
            assert m.drift.score == pytest.approx(a.drift.score, rel=1e-4)


# --- /stats and /metrics ----------------------------------------------------------------


def test_stats_keep_the_latest_score_an_average_the_maximum_and_a_history(client) -> None:
    scores = [_eval(client, "stream.bn", _x("stream.bn", s, shift=s / 4))["drift"]["score"]
              for s in range(5)]
    entry = client.get("/stats/stream.bn").json()["drift"]
    assert entry["reference"] == "running"
    assert entry["score"] == pytest.approx(scores[-1])
    assert entry["max"] == pytest.approx(max(scores))
    ema = scores[0]
    for s in scores[1:]:
        ema += 0.1 * (s - ema)
    assert entry["ema"] == pytest.approx(ema)
    assert [v for _, v in entry["history"]] == pytest.approx(scores)
    assert entry["scored"] == 5
    assert entry["threshold"] is None
    assert "reference_mean" not in entry
    assert client.get("/stats").json()["layers"]["stream.bn"]["drift"]["scored"] == 5


def test_metrics_show_a_gauge_a_histogram_and_crossings(client) -> None:
    put = client.put("/layers/watch.bn", json={
        "kind": "BatchNorm1d", "config": {"num_features": 8}, "drift_threshold": 0.5})
    assert put.status_code == 200, put.text
    x = np.random.default_rng(0).normal(0, 1, (256, 8)).astype(np.float32)
    scores = [_eval(client, "watch.bn", x + shift)["drift"]["score"]
              for shift in (0, 2, 0, 2, 2)]
    text = client.get("/metrics").text
    assert f'normcore_drift_score{{layer="watch.bn"}} {scores[-1]}' in text
    assert 'normcore_batch_drift_count{layer="watch.bn"} 5.0' in text
    assert 'normcore_batch_drift_bucket{layer="watch.bn",le="+Inf"} 5.0' in text
    assert 'normcore_drift_crossings_total{layer="watch.bn"} 2.0' in text
    assert 'normcore_drift_crossings_total{layer="stream.bn"}' not in text  # no threshold


# --- the threshold ------------------------------------------------------------------------


def test_crossings_count_rising_edges_and_are_logged(client, caplog) -> None:
    client.put("/layers/watch.bn", json={
        "kind": "BatchNorm1d", "config": {"num_features": 8}, "drift_threshold": 0.5})
    x = np.random.default_rng(0).normal(0, 1, (256, 8)).astype(np.float32)
    with caplog.at_level(logging.WARNING, logger="normcore.drift"):
        for shift in (0, 2, 2, 0, 2, 0):
            _eval(client, "watch.bn", x + shift)
    entry = client.get("/stats/watch.bn").json()["drift"]
    assert entry["threshold"] == 0.5
    assert entry["crossings"] == 2
    logged = [r.getMessage() for r in caplog.records if r.name == "normcore.drift"]
    assert len(logged) == 2
    assert "watch.bn" in logged[0]
    assert "drift_threshold 0.5" in logged[0]


@pytest.mark.parametrize("threshold", [0, -1, "high", True, None])
def test_put_layers_checks_the_threshold(client, threshold) -> None:
    reply = client.put("/layers/t.bn", json={
        "kind": "BatchNorm1d", "config": {"num_features": 4}, "drift_threshold": threshold})
    if threshold is None:
        assert reply.status_code == 200
        assert reply.json()["drift"]["threshold"] is None
    else:
        assert reply.status_code == 422, reply.text


def test_catalog_threshold_applies_and_is_checked(tmp_path: Path) -> None:
    catalog = tmp_path / "catalog.toml"
    catalog.write_text('[[layer]]\nname = "a.bn"\nkind = "BatchNorm1d"\nnum_features = 4\n'
                       'drift_threshold = 0.25\n')
    assert load_catalog(catalog)[0].drift_threshold == 0.25
    with make_client(catalog=catalog) as client:
        assert client.get("/stats/a.bn").json()["drift"]["threshold"] == 0.25
    catalog.write_text('[[layer]]\nname = "a.bn"\nkind = "BatchNorm1d"\nnum_features = 4\n'
                       'drift_threshold = "no"\n')
    with pytest.raises(CatalogError, match="drift_threshold must be a positive number"):
        load_catalog(catalog)


def test_a_threshold_put_through_the_api_survives_a_restart(tmp_path: Path) -> None:
    body = {"kind": "BatchNorm1d", "config": {"num_features": 4}, "drift_threshold": 0.75}
    with make_client(state_dir=tmp_path) as client:
        assert client.put("/layers/kept.bn", json=body).status_code == 200
    with make_client(state_dir=tmp_path) as client:
        assert client.get("/stats/kept.bn").json()["drift"]["threshold"] == 0.75


# --- V2 ---------------------------------------------------------------------------------


def _v2(client, name: str, x: np.ndarray, outputs: list[str], mode: str = "eval"):
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape),
                        "data": x.ravel().tolist()}],
            "outputs": [{"name": n} for n in outputs], "parameters": {"mode": mode}}
    return client.post(f"/v2/models/{name}/infer", content=json.dumps(body))


def test_v2_gives_the_drift_output_when_asked_for(client) -> None:
    x = _x("stream.bn", 7)
    reply = _v2(client, "stream.bn", x, ["output", "drift"])
    assert reply.status_code == 200, reply.text
    outputs = {o["name"]: o for o in reply.json()["outputs"]}
    assert outputs["drift"]["shape"] == [1]
    assert outputs["drift"]["datatype"] == "FP32"
    score = client.get("/stats/stream.bn").json()["drift"]["score"]
    assert outputs["drift"]["data"][0] == pytest.approx(score, rel=1e-6)
    # No reference yet: NaN, which JSON writes as null.
    first = _v2(client, "features.rms", _x("features.rms"), ["drift"]).json()
    assert first["outputs"][0]["data"] == [None]
    refused = _v2(client, "stream.bn", x, ["drift"], mode="train")
    assert refused.status_code == 400
    assert "eval mode only" in refused.json()["error"]
