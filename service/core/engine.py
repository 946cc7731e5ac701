"""The service's logic over the store: normalize, train, inspect and administer layers.

Every route makes one call here, and nothing but the engine calls the store. No HTTP and no
wire format: inputs are tensors and plain values, results are tensors and dataclasses,
errors are the exceptions of ``service.core.errors``.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from normcore.checkpoint import load_layer_state, load_state_dict_bytes, modules_state_bytes

from .. import tracing
from ..state.changes import AWAITED_ON_LOOP
from ..state.idempotency import KeyWindow
from ..state.store import Outcome, Slot, Store, num_batches
from .catalog import (
    LayerSpec,
    check_arguments,
    check_drift_threshold,
    layer_config,
    layer_width,
    make_layer,
    models_of,
)
from .devices import resolve_device
from .drift import DriftInfo
from .errors import (
    NAME,
    NAME_PATTERN,
    InvalidRequestError,
    LayerUnloadedError,
    ModelNotFoundError,
)

MODES = ("eval", "train")

__all__ = ["MODES", "Engine", "LayerInfo", "Outcome", "ServerInfo"]


@dataclass(frozen=True)
class LayerInfo:
    """One served layer as ``/stats`` shows it."""

    name: str
    kind: str
    device: torch.device
    config: dict[str, Any]
    checkpoint: Path | None
    requests: dict[str, int]
    rejected: int
    last_update: float | None  # seconds since the epoch
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    num_batches_tracked: int | None
    drift: DriftInfo
    version: int = 1  # changes when the layer is replaced
    loaded: bool = True  # served; an unloaded layer keeps its state
    compute_ns: int = 0  # time spent normalizing
    last_inference: float | None = None  # seconds since the epoch


@dataclass(frozen=True)
class ServerInfo:
    layers: list[LayerInfo]
    uptime_seconds: float
    persistence: str
    default_device: torch.device
    time: float  # seconds since the epoch, as the server's clock says now


def check_request_id(request_id: str | None) -> None:
    """An idempotency key is 1 to ``KeyWindow.MAX_KEY`` characters."""
    if request_id is not None and not 0 < len(request_id) <= KeyWindow.MAX_KEY:
        raise InvalidRequestError(f"request_id must be 1 to {KeyWindow.MAX_KEY} characters")


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise InvalidRequestError("mode must be 'eval' or 'train'")


class Engine:
    """Normalize/train/inspect/administer the layers of one store."""

    def __init__(self, store: Store, *, max_layers: int = 1024,
                 max_layer_features: int = 1 << 20, catalog_folder: Path | None = None) -> None:
        self.store = store
        self.max_layers = max_layers
        self.max_layer_features = max_layer_features
        self.catalog_folder = catalog_folder  # checkpoint paths are shown relative to it
        self.started = time.time()
        # The catalog's [[model]] entries: {name_prefix: {module path: layer name}}. Fixed at
        # load; a layer replaced through the admin API keeps its place in its model.
        self.models: dict[str, dict[str, str]] = {}

    # --- life cycle ---------------------------------------------------------------------

    def load(self, specs: list[LayerSpec]) -> None:
        """Serve ``specs``, with any saved state over them."""
        self.models = models_of(specs)
        self.store.load(specs)

    def close(self) -> None:
        """Make every change safe before the process stops."""
        self.store.close()

    # --- normalize ----------------------------------------------------------------------

    def kind_of(self, name: str) -> str:
        """The kind of a layer; ``LayerNotFoundError`` if there is none."""
        return self.store.slot(name).spec.kind

    def served(self, name: str) -> tuple[str, int]:
        """(kind, version) of a layer that is served: ``LayerNotFoundError`` if there is
        none, ``LayerUnloadedError`` if it is unloaded."""
        slot = self.store.slot(name)
        if not slot.loaded:
            raise LayerUnloadedError(name)
        return slot.spec.kind, slot.version

    def layer_count(self) -> int:
        return len(self.store)

    @property
    def durable(self) -> bool:
        """Whether changes wait for a change log (a train step may block on the disk)."""
        return self.store.persistence != "memory"

    def readiness(self) -> tuple[int, str]:
        """(layers served, the state's persistence: "memory", "durable" or what is wrong)."""
        return len(self.store), self.store.persistence

    def normalize(
        self, name: str, x: torch.Tensor, mode: str, request_id: str | None = None,
        deadline: float | None = None,
    ) -> Outcome:
        """Eval or train ``x`` with the layer ``name``. A call that cannot start by
        ``deadline`` (time.monotonic) raises ``RequestTimeoutError`` with nothing applied."""
        if mode == "train":
            return self.start_train(name, x, request_id, deadline).result()
        check_mode(mode)
        check_request_id(request_id)
        self._check_served(name, x)
        if tracing.enabled():  # off: not even a no-op span on the hot path
            with tracing.span("normalize", **{"normcore.layer": name, "normcore.mode": mode}):
                return self.store.evaluate(name, x, deadline)
        return self.store.evaluate(name, x, deadline)

    def start_train(self, name: str, x: torch.Tensor, request_id: str | None = None,
                    deadline: float | None = None) -> Future:
        """A train step taken now (or refused: raises, nothing applied), as a future that
        settles with its ``Outcome`` once the step is safe: at once in memory, after the
        group commit with a change log. For the event loop that awaits it (it may be
        settled on that loop's thread: never block on it there)."""
        check_request_id(request_id)
        self._check_served(name, x)
        awaited = AWAITED_ON_LOOP.set(True)  # by hand: a context manager costs microseconds
        try:
            if tracing.enabled():
                with tracing.span("normalize", **{"normcore.layer": name,
                                                  "normcore.mode": "train"}):
                    return self.store.start_train(name, x, request_id, deadline)
            return self.store.start_train(name, x, request_id, deadline)
        finally:
            AWAITED_ON_LOOP.reset(awaited)

    def _check_served(self, name: str, x: torch.Tensor) -> None:
        slot = self.store.slot(name)
        if not slot.loaded:
            raise LayerUnloadedError(name)
        _check_instance_channels(slot, x)

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
        with tracing.span("normalize batch", **{"normcore.layer": name,
                                                "normcore.batch_requests": len(xs)}):
            return self.store.evaluate_many(name, xs)

    # --- statistics ---------------------------------------------------------------------

    def layer_info(self, name: str) -> LayerInfo:
        return self._info(name, self.store.slot(name))

    def server_info(self) -> ServerInfo:
        now = time.time()
        return ServerInfo(
            [self._info(name, slot) for name, slot in self.store],
            round(now - self.started, 3),
            self.store.persistence,
            self.store.default_device,
            now,
        )

    # --- models -------------------------------------------------------------------------

    def model_layers(self, prefix: str) -> dict[str, str]:
        """A catalog model's layers by module path; ``ModelNotFoundError`` if none."""
        try:
            return dict(self.models[prefix])
        except KeyError:
            raise ModelNotFoundError(prefix) from None

    def export_model(self, prefix: str) -> bytes:
        """A catalog model's served state as one safetensors file keyed by module path
        (``features.1.running_mean``, ...): what ``model.load_state_dict(...,
        strict=False)`` takes. ``LayerNotFoundError`` if one of its layers was deleted.
        Each layer is read as served when its turn comes, not all at one instant."""
        layers = {module: self.store.slot(name).layer
                  for module, name in self.model_layers(prefix).items()}
        return modules_state_bytes(layers)

    # --- admin --------------------------------------------------------------------------

    def put_layer(
        self, name: str, kind: str, config: dict[str, Any], checkpoint: bytes | None = None,
        prefix: str = "", device: str | None = None, drift_threshold: float | None = None,
    ) -> LayerInfo:
        """Create or replace a layer from its configuration and optional safetensors;
        eval batches whose drift score goes over ``drift_threshold`` are counted."""
        if not NAME.match(name):
            raise InvalidRequestError(f"layer name must match {NAME_PATTERN}")
        try:
            check_arguments(kind, config)
            drift_threshold = check_drift_threshold(drift_threshold)
            if device is not None:
                resolve_device(device)
        except ValueError as exc:
            raise InvalidRequestError(str(exc)) from None
        # Checked before anything is built: one short request must not make a huge layer.
        width = layer_width(kind, config)
        if width > self.max_layer_features:
            raise InvalidRequestError(
                f"a layer {width} wide exceeds max_layer_features ({self.max_layer_features}, "
                "NORMCORE_MAX_LAYER_FEATURES)")
        if name not in self.store and len(self.store) >= self.max_layers:
            raise InvalidRequestError(
                f"{len(self.store)} layers are served, the limit of max_layers "
                "(NORMCORE_MAX_LAYERS); delete one first")
        try:
            layer = make_layer(kind, config)
        except ValueError as exc:
            raise InvalidRequestError(str(exc)) from None
        state = None
        if checkpoint is not None:
            state = load_state_dict_bytes(checkpoint, source="uploaded checkpoint")
            load_layer_state(layer, state, prefix, source="uploaded checkpoint")
        spec = LayerSpec(name, kind, dict(config), None, prefix, device, state, drift_threshold)
        self.store.put(spec, layer)
        return self.layer_info(name)

    def load_layer(self, name: str) -> None:
        """Serve an unloaded layer again (V2 repository load)."""
        self.store.set_loaded(name, True)

    def unload_layer(self, name: str) -> None:
        """Stop serving a layer and keep it, state and all (V2 repository unload)."""
        self.store.set_loaded(name, False)

    def delete_layer(self, name: str) -> None:
        self.store.delete(name)

    def reset_layer(self, name: str) -> LayerInfo:
        self.store.reset(name)
        return self.layer_info(name)

    def upload_state(self, name: str, safetensors: bytes) -> LayerInfo:
        """Replace a layer's state with the tensors of a safetensors file."""
        self.store.slot(name)  # 404 before the file is parsed
        state = load_state_dict_bytes(safetensors, source="uploaded state")
        self.store.load_state(name, state)
        return self.layer_info(name)

    def export_layer(self, name: str) -> bytes:
        """The layer's state as a safetensors file."""
        return self.store.export(name)

    def _info(self, name: str, slot: Slot) -> LayerInfo:
        layer = slot.layer
        running_mean = getattr(layer, "running_mean", None)
        return LayerInfo(
            name, slot.spec.kind, slot.device, layer_config(layer, slot.spec.kind),
            self._shown_path(slot.spec.checkpoint), dict(slot.requests), slot.rejected,
            slot.last_update, running_mean,
            None if running_mean is None else layer.running_var, num_batches(layer),
            slot.drift.info(layer), slot.version, slot.loaded, slot.compute_ns,
            slot.last_inference,
        )

    def _shown_path(self, path: Path | None) -> Path | None:
        """A checkpoint's path relative to the catalog's folder: the server's own disk
        layout is nobody's business."""
        if path is None or self.catalog_folder is None:
            return None if path is None else Path(path.name)
        try:
            return path.relative_to(self.catalog_folder.resolve())
        except ValueError:
            return Path(path.name)


def _check_instance_channels(slot: Slot, x: torch.Tensor) -> None:
    """A served InstanceNorm takes the channel count it declares. (torch.nn lets a layer
    without affine or running statistics take any count, with a warning per call.)"""
    if not slot.spec.kind.startswith("InstanceNorm"):
        return
    dim = x.dim() - int(slot.spec.kind[-2]) - 1  # the channel dim, batched or not
    features = slot.layer.num_features
    if dim in (0, 1) and x.size(dim) != features:
        raise InvalidRequestError(f"expected {features} channels at dim {dim}, "
                                  f"got {x.size(dim)} (input shape {list(x.shape)})")
