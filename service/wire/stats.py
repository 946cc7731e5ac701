"""JSON views of what the engine reports: a layer's entry (``/stats/{name}``, admin
replies) and the whole server (``/stats``)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from ..core.engine import LayerInfo, ServerInfo
from .drift import encode_drift_info

# Layers wider than this show their running statistics only in their own entry.
SUMMARY_WIDTH = 4096


def _iso(timestamp: float | None) -> str | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, UTC).isoformat()


def encode_layer(info: LayerInfo, summary: bool = False) -> dict[str, Any]:
    """A layer's entry; running statistics (and a drift input reference) as float lists
    (null for NaN/Inf), unless ``summary`` and the layer is wider than ``SUMMARY_WIDTH``."""
    entry: dict[str, Any] = {
        "kind": info.kind,
        "device": str(info.device),
        "config": info.config,
        "checkpoint": str(info.checkpoint) if info.checkpoint else None,
        "requests": info.requests,
        "rejected": info.rejected,
        "last_update": _iso(info.last_update),
    }
    if info.running_mean is not None and summary and info.running_mean.numel() > SUMMARY_WIDTH:
        entry["summarized"] = True
    elif info.running_mean is not None:
        entry["running_mean"] = info.running_mean.detach().cpu().double().tolist()
        entry["running_var"] = info.running_var.detach().cpu().double().tolist()
    entry["num_batches_tracked"] = info.num_batches_tracked
    reference = info.drift.reference_mean
    wide = summary and reference is not None and reference.numel() > SUMMARY_WIDTH
    if wide:
        entry["summarized"] = True
    entry["drift"] = encode_drift_info(info.drift, with_reference=not wide)
    return entry


def encode_server(info: ServerInfo) -> dict[str, Any]:
    """Every layer's entry and server-wide counters; a wide layer's running statistics are
    left out (``"summarized": true``) and served whole by its own entry."""
    layers = {layer.name: encode_layer(layer, summary=True) for layer in info.layers}
    totals = {"eval": 0, "train": 0}
    for layer in info.layers:
        for mode, count in layer.requests.items():
            totals[mode] += count
    return {
        "layers": layers,
        "server": {
            "layers": len(layers),
            "requests": totals,
            "rejected": sum(layer.rejected for layer in info.layers),
            "uptime_seconds": info.uptime_seconds,
            "time": round(info.time, 3),
            "persistence": info.persistence,
            "default_device": str(info.default_device),
        },
    }
