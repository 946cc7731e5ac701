"""Named layers, their locks and their persistence. Only the store mutates layer state.

Train steps are copy-on-write: under the layer's lock, a private copy of the layer takes
the step, the step is recorded, and then the copy replaces the served layer in one
reference swap. Eval requests read whichever layer is current without locking, so they
run concurrently, never switch a shared module between modes, and never see a
half-applied update; a rejected step leaves the served layer exactly as it was.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from normcore.checkpoint import layer_state_bytes, load_layer_state
from normcore.functional import Normalized, RMSNormalized

from .catalog import LayerSpec


class LayerNotFoundError(KeyError):
    """No layer of that name is served."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"unknown layer {self.name!r}"


@dataclass
class Slot:
    """One served layer and what is known about it."""

    spec: LayerSpec
    layer: nn.Module
    device: torch.device
    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: dict[str, int] = field(default_factory=lambda: {"eval": 0, "train": 0})
    rejected: int = 0
    last_update: float | None = None


@dataclass(frozen=True)
class TrainResult:
    result: Normalized | RMSNormalized
    num_batches_tracked: int | None


def fork(layer: nn.Module) -> nn.Module:
    """A copy with its own buffers; parameters, which train steps never change, are shared."""
    return copy.deepcopy(layer, memo={id(p): p for p in layer.parameters()})


def num_batches(layer: nn.Module) -> int | None:
    count = getattr(layer, "num_batches_tracked", None)
    return None if count is None else int(count)


def _computing_copy(layer: nn.Module, x: torch.Tensor) -> nn.Module | None:
    """A private float64 copy of a float32 layer for float64 input, else None.

    float16/bfloat16 inputs run natively against float32 state, as in torch.nn; float64
    input is computed in float64 (torch.nn would refuse the mix) and any state it changes
    is stored back in the layer's own dtype.
    """
    if x.dtype != torch.float64:
        return None
    state = layer.state_dict().values()
    if all(t.dtype == torch.float64 for t in state if t.is_floating_point()):
        return None
    # A full copy: converting a module rewrites its parameters in place, and a fork's
    # parameters are the served layer's own.
    return copy.deepcopy(layer).double()


def _restore_dtype(computed: nn.Module, like: nn.Module) -> nn.Module:
    dtype = next((t.dtype for t in like.state_dict().values() if t.is_floating_point()), None)
    return computed if dtype is None else computed.to(dtype)


class Store:
    """The served layers by name."""

    def __init__(self, default_device: torch.device, *, reject_non_finite: bool = True) -> None:
        self.default_device = default_device
        self.reject_non_finite = reject_non_finite
        self._slots: dict[str, Slot] = {}
        self._admin = threading.Lock()  # serializes adding, replacing and removing layers
        # Called with (name, new_layer, request_id) under the layer's lock, after a step and
        # before it is served; the durable journal plugs in here. Returns a wait function
        # that blocks until the record is safe.
        self.on_update: Callable[[str, nn.Module, str | None], Callable[[], None]] | None = None

    def __contains__(self, name: str) -> bool:
        return name in self._slots

    def __iter__(self) -> Iterator[tuple[str, Slot]]:
        return iter(list(self._slots.items()))

    def __len__(self) -> int:
        return len(self._slots)

    def slot(self, name: str) -> Slot:
        try:
            return self._slots[name]
        except KeyError:
            raise LayerNotFoundError(name) from None

    def device_for(self, spec: LayerSpec) -> torch.device:
        return torch.device(spec.device) if spec.device else self.default_device

    def _serve(self, layer: nn.Module, device: torch.device) -> nn.Module:
        layer = layer.to(device).eval()
        if hasattr(layer, "reject_non_finite"):
            layer.reject_non_finite = self.reject_non_finite
        return layer

    # --- layers -------------------------------------------------------------------------

    def put(self, spec: LayerSpec, layer: nn.Module | None = None) -> Slot:
        """Serve ``spec`` (built from its checkpoint unless ``layer`` is given)."""
        device = self.device_for(spec)
        layer = self._serve(layer if layer is not None else spec.build(device), device)
        slot = Slot(spec, layer, device)
        with self._admin:
            self._slots[spec.name] = slot
        return slot

    def delete(self, name: str) -> None:
        with self._admin:
            if self._slots.pop(name, None) is None:
                raise LayerNotFoundError(name)

    def reset(self, name: str) -> Slot:
        """Back to the checkpoint's statistics (torch's defaults without one)."""
        slot = self.slot(name)
        fresh = self._serve(slot.spec.build(slot.device), slot.device)
        with slot.lock:
            wait = self.on_update(name, fresh, None) if self.on_update else None
            slot.layer = fresh
            slot.last_update = time.time()
        if wait is not None:
            wait()
        return slot

    def load_state(self, name: str, state: dict[str, torch.Tensor]) -> Slot:
        """Replace the layer's state with checked values from ``state`` (torch.nn keys)."""
        slot = self.slot(name)
        with slot.lock:
            layer = fork(slot.layer)
            load_layer_state(layer, state, source="uploaded state")
            wait = self.on_update(name, layer, None) if self.on_update else None
            slot.layer = layer
            slot.last_update = time.time()
        if wait is not None:
            wait()
        return slot

    def export(self, name: str) -> bytes:
        """The layer's current state as safetensors bytes."""
        return layer_state_bytes(self.slot(name).layer)

    # --- steps --------------------------------------------------------------------------

    def evaluate(self, name: str, x: torch.Tensor) -> Normalized | RMSNormalized:
        """Normalize with the current layer in eval mode; changes nothing."""
        slot = self.slot(name)
        layer = slot.layer  # one read: a concurrent train step swaps, never edits, it
        layer = _computing_copy(layer, x) or layer
        with torch.inference_mode():
            result = layer.normalize(x.to(slot.device), train=False)
        slot.requests["eval"] += 1
        return result

    def train(self, name: str, x: torch.Tensor, request_id: str | None = None) -> TrainResult:
        """Take one train step on the layer; raises (changing nothing) if it is rejected."""
        slot = self.slot(name)
        with slot.lock:
            wide = _computing_copy(slot.layer, x)
            layer = wide if wide is not None else fork(slot.layer)
            try:
                with torch.inference_mode():
                    result = layer.normalize(x.to(slot.device), train=True)
                if wide is not None:
                    layer = _restore_dtype(layer, slot.layer)
            except Exception:
                slot.rejected += 1
                raise
            wait = self.on_update(name, layer, request_id) if self.on_update else None
            slot.layer = layer
            slot.requests["train"] += 1
            slot.last_update = time.time()
        if wait is not None:
            wait()
        return TrainResult(result, num_batches(layer))
