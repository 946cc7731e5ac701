"""The service's logic over the store: normalize, train, statistics, layer admin.

No HTTP here: inputs are tensors and plain values, errors are exceptions that
``service.errors`` maps to status codes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import torch

from normcore.checkpoint import load_layer_state, load_state_dict_bytes

from .catalog import DEVICE, NAME, LayerSpec, constructor_args, make_layer
from .idempotency import IdempotencyConflictError
from .store import Slot, Store, num_batches

MODES = ("eval", "train")


class RequestError(ValueError):
    """A request the engine refuses (bad mode, layer name, configuration)."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Outcome:
    """What one normalize call produced."""

    output: torch.Tensor
    stats: dict[str, torch.Tensor]  # mean/var, or mean_square for RMSNorm
    num_batches_tracked: int | None  # after a train step on a layer that counts them


def _iso(timestamp: float | None) -> str | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, UTC).isoformat()


def layer_config(layer: torch.nn.Module, kind: str) -> dict[str, Any]:
    """The layer's constructor arguments as they are now (JSON-ready)."""
    config: dict[str, Any] = {}
    for name in constructor_args(kind):
        value = getattr(layer, name, None)
        if name == "bias":  # LayerNorm's bias flag shares its name with the parameter
            value = value is not None
        elif name == "momentum" and value is None:
            value = "cumulative"
        elif isinstance(value, tuple):
            value = list(value)
        config[name] = value
    return config


class Engine:
    """Normalize/train/inspect/administer the layers of one store."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.started = time.time()

    # --- normalize ----------------------------------------------------------------------

    def normalize(
        self, name: str, x: torch.Tensor, mode: str, request_id: str | None = None
    ) -> Outcome:
        if mode not in MODES:
            raise RequestError(f"mode must be 'eval' or 'train', not {mode!r}")
        if mode == "eval":
            result = self.store.evaluate(name, x)
            return Outcome(result.output, _stats(result), None)
        try:
            step = self.store.train(name, x, request_id)
        except IdempotencyConflictError as exc:
            raise RequestError(str(exc), 409) from None
        return Outcome(step.result.output, _stats(step.result), step.num_batches_tracked)

    def can_batch(self, name: str, x: torch.Tensor) -> bool:
        """Whether an eval request may be merged with others along dim 0: it must have a
        batch dim the layer treats sample by sample (or, for BatchNorm, with running
        statistics), and run natively (no float64-on-float32 widening)."""
        slot = self.store.slot(name)
        kind, layer = slot.spec.kind, slot.layer
        if x.dtype == torch.float64 or x.dim() < 2:
            return False
        if kind.startswith("BatchNorm"):
            return layer.running_mean is not None
        if kind.startswith("InstanceNorm"):
            return x.dim() == int(kind[-2]) + 2
        if kind in ("LayerNorm", "RMSNorm"):
            return x.dim() > len(layer.normalized_shape)
        return True

    def evaluate_many(self, name: str, xs: list[torch.Tensor]) -> list[Outcome]:
        """Eval outcomes for inputs merged into one layer call (see ``can_batch``)."""
        return [Outcome(r.output, _stats(r), None) for r in self.store.evaluate_many(name, xs)]

    # --- statistics ---------------------------------------------------------------------

    def layer_entry(self, name: str) -> dict[str, Any]:
        return self._entry(self.store.slot(name))

    def _entry(self, slot: Slot) -> dict[str, Any]:
        layer = slot.layer
        entry: dict[str, Any] = {
            "kind": slot.spec.kind,
            "device": str(slot.device),
            "config": layer_config(layer, slot.spec.kind),
            "checkpoint": str(slot.spec.checkpoint) if slot.spec.checkpoint else None,
            "requests": dict(slot.requests),
            "rejected": slot.rejected,
            "last_update": _iso(slot.last_update),
        }
        running_mean = getattr(layer, "running_mean", None)
        if running_mean is not None:
            entry["running_mean"] = running_mean.detach().cpu().double().tolist()
            entry["running_var"] = layer.running_var.detach().cpu().double().tolist()
        entry["num_batches_tracked"] = num_batches(layer)
        return entry

    def stats(self) -> dict[str, Any]:
        layers = {name: self._entry(slot) for name, slot in self.store}
        totals = {"eval": 0, "train": 0}
        for entry in layers.values():
            for mode, count in entry["requests"].items():
                totals[mode] += count
        return {
            "layers": layers,
            "server": {
                "layers": len(layers),
                "requests": totals,
                "rejected": sum(e["rejected"] for e in layers.values()),
                "uptime_seconds": round(time.time() - self.started, 3),
                "persistence": self.store.persistence,
                "default_device": str(self.store.default_device),
            },
        }

    # --- admin --------------------------------------------------------------------------

    def put_layer(
        self, name: str, kind: str, config: dict[str, Any], checkpoint: bytes | None = None,
        prefix: str = "", device: str | None = None,
    ) -> dict[str, Any]:
        """Create or replace a layer from its configuration and optional safetensors."""
        if not NAME.match(name):
            raise RequestError("layer name must match [A-Za-z0-9._-]{1,128}")
        try:
            layer = make_layer(kind, config)
        except ValueError as exc:
            raise RequestError(str(exc)) from None
        state = None
        if checkpoint is not None:
            state = load_state_dict_bytes(checkpoint, source="uploaded checkpoint")
            load_layer_state(layer, state, prefix, source="uploaded checkpoint")
        if device is not None:
            _check_device(device)
        spec = LayerSpec(name, kind, dict(config), None, prefix, device, state)
        self.store.put(spec, layer)
        return self.layer_entry(name)

    def delete_layer(self, name: str) -> None:
        self.store.delete(name)

    def reset_layer(self, name: str) -> dict[str, Any]:
        self.store.reset(name)
        return self.layer_entry(name)

    def load_state(self, name: str, state: dict[str, torch.Tensor]) -> dict[str, Any]:
        self.store.load_state(name, state)
        return self.layer_entry(name)

    def export_layer(self, name: str) -> bytes:
        return self.store.export(name)


def _check_device(device: str) -> None:
    if not DEVICE.match(device):
        raise RequestError("device must be cpu, cuda or cuda:N")
    parsed = torch.device(device)
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise RequestError("device cuda requested but CUDA is not available here")
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise RequestError(f"device {device} does not exist here "
                           f"({torch.cuda.device_count()} CUDA devices)")


def _stats(result: Any) -> dict[str, torch.Tensor]:
    return {k: v for k, v in result._asdict().items() if k != "output"}
