"""What a record or a snapshot says of a served layer, the same for the embedded journal
(``persistence.py``) and the shared log (``shared/codec.py``): the spec of a layer put
through the admin API, and each layer's state (plus, for such a layer, the state a reset
returns it to) as named tensors.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from normcore.checkpoint import load_layer_state
from normcore.errors import CheckpointError

from ..core.catalog import LayerSpec
from .records import StateFileError

Tensors = dict[str, torch.Tensor]

log = logging.getLogger("normcore.service")


def load_saved_state(layer: nn.Module, state: Tensors, name: str, where: object,
                     source: str) -> nn.Module:
    """``layer`` holding ``state``, its own saved state, over its defaults; StateFileError
    (naming ``where``) if it does not fit. NaN and Inf are let through: only train steps
    let in by allow_non_finite put them there. They are said in the log, as running
    statistics do not recover from them by themselves (a reset does)."""
    try:
        load_layer_state(layer, {**layer.state_dict(), **state}, source=source,
                         require_finite=False)
    except CheckpointError as exc:
        raise StateFileError(f"{where}: the saved state does not fit the layer: {exc}") \
            from None
    if not all(bool(torch.isfinite(t).all()) for t in layer.state_dict().values()
               if t.is_floating_point()):
        log.warning("layer %r was restored with NaN or Inf in its state (train steps taken "
                    "with allow_non_finite); they stay until the layer is reset", name)
    return layer


def spec_meta(spec: LayerSpec) -> dict[str, Any]:
    """What a put records of its spec (``origin_spec`` takes it back)."""
    return {"kind": spec.kind, "config": spec.kwargs, "device": spec.device,
            "drift_threshold": spec.drift_threshold}


def origin_spec(name: str, meta: dict[str, Any], state: Tensors) -> LayerSpec:
    """The spec of a layer created through the admin API (``meta``: its kind, config,
    device and drift threshold): a reset returns it to ``state``."""
    return LayerSpec(name, meta["kind"], dict(meta["config"]), None, "", meta.get("device"),
                     state, meta.get("drift_threshold"))


def snapshot_layers(layers: Iterable[tuple[str, LayerSpec, nn.Module, bool]]
                    ) -> tuple[list[dict[str, Any]], Tensors]:
    """The metadata and tensors of ``(name, spec, layer, uploaded)``: ``name/state/...``
    for every layer, ``name/origin/...`` for an uploaded one (``pick`` reads them back)."""
    metas, tensors = [], {}
    for name, spec, layer, uploaded in layers:
        metas.append({"name": name, **spec_meta(spec), "uploaded": uploaded})
        for key, value in layer.state_dict().items():
            tensors[f"{name}/state/{key}"] = value
        if uploaded:
            for key, value in spec.state.items():
                tensors[f"{name}/origin/{key}"] = value
    return metas, tensors


def pick(tensors: Tensors, prefix: str) -> Tensors:
    """The tensors named ``prefix...``, without the prefix."""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
