"""JSON views of drift: one eval batch's score (``/normalize`` replies) and a layer's drift
record (``/stats``)."""

from __future__ import annotations

from typing import Any

from ..core.drift import Drift, DriftInfo


def _channels(channels: tuple[tuple[int, float], ...]) -> list[dict[str, Any]]:
    return [{"channel": index, "score": value} for index, value in channels]


def encode_drift(drift: Drift | None) -> dict[str, Any]:
    """``{"score": float | null, "channels": [{"channel", "score"}, ...]}``, the channels
    that moved most first."""
    if drift is None:
        return {"score": None, "channels": []}
    return {"score": drift.score, "channels": _channels(drift.channels)}


def encode_drift_info(info: DriftInfo, with_reference: bool = True) -> dict[str, Any]:
    """A layer's drift entry; the input reference's statistics (layers without running
    statistics) unless ``with_reference`` is False."""
    entry: dict[str, Any] = {
        "reference": info.reference,
        "score": info.latest,
        "ema": info.ema,
        "max": info.max,
        "scored": info.scored,
        "threshold": info.threshold,
        "crossings": info.crossings,
        "channels": _channels(info.channels),
        "history": [[round(t, 3), value] for t, value in info.history],
    }
    if info.reference == "inputs":
        entry["reference_batches"] = info.reference_batches
        if with_reference and info.reference_mean is not None:
            entry["reference_mean"] = info.reference_mean.detach().cpu().double().tolist()
            entry["reference_var"] = info.reference_var.detach().cpu().double().tolist()
    return entry
