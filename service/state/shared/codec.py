"""Changes and snapshots as the shared log stores them: ``records.py`` payloads in rows.

A log row holds one change: its op, the layer's name and a payload (metadata + tensors):

    train       {"count", "key": [request_id, digest]?} + mean, var (the ``StepDelta``)
    reset       the layer's full state
    load_state  the layer's full state
    put         {"kind", "config", "device"} + the full state (also what a reset returns to)
    delete      nothing

A snapshot is every layer's full state as of one position in the log, the request_ids of
the steps up to it, and the catalog layers deleted by then: the embedded snapshot's
format (``persistence.py``), with the log position in place of a journal generation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...core.catalog import LayerSpec, make_layer
from ..changes import Change, StepDelta
from ..idempotency import Applied, KeyWindow
from ..layer_records import load_saved_state, origin_spec, pick, snapshot_layers, spec_meta
from ..records import StateFileError, decode_record, encode_record

FORMAT = 1
Tensors = dict[str, torch.Tensor]


def build(spec: LayerSpec, state: Tensors, source: str) -> nn.Module:
    """``spec``'s layer (on the CPU) holding ``state`` over its defaults."""
    layer = make_layer(spec.kind, spec.kwargs)
    return load_saved_state(layer, state, spec.name, source, source).eval()


def encode_change(change: Change) -> bytes:
    meta: dict[str, Any] = {}
    tensors: Tensors = {}
    if change.op == "train":
        if change.key is not None and change.applied is not None:
            meta["key"] = [change.key, change.applied.digest]
        if change.delta is not None:
            meta["count"] = change.delta.count
            tensors = {"mean": change.delta.mean, "var": change.delta.var}
    elif change.op != "delete":
        tensors = dict(change.layer.state_dict())
        if change.op == "put":
            meta = spec_meta(change.spec)
    return encode_record(meta, tensors)


def decode_change(seq: int, op: str, name: str, body: bytes,
                  spec_of: Callable[[str], LayerSpec | None]) -> Change:
    """The change of log row ``seq``; ``spec_of`` gives a served layer's spec (what a reset
    or an uploaded state is built as)."""
    source = f"log record {seq}"
    meta, tensors = decode_record(body, source)
    try:
        if op == "train":
            delta = None
            if "count" in meta:
                delta = StepDelta(tensors["mean"], tensors["var"], int(meta["count"]))
            key, applied = None, None
            if "key" in meta:
                key, digest = meta["key"]
                applied = Applied(name, digest)
            return Change("train", name, key=key, applied=applied, delta=delta)
        if op == "delete":
            return Change("delete", name)
        if op == "put":
            spec = origin_spec(name, meta, tensors)
            return Change("put", name, build(spec, tensors, source), spec=spec)
        if op in ("reset", "load_state"):
            spec = spec_of(name)
            layer = None if spec is None else build(spec, tensors, source)
            return Change(op, name, layer)
    except (KeyError, TypeError, ValueError) as exc:
        raise StateFileError(f"{source}: malformed ({exc!r})") from None
    raise StateFileError(f"{source}: unknown op {op!r}")


@dataclass
class Entry:
    """One layer as the log knows it: its spec and the layer served after the last
    change applied (layers are never modified once served)."""

    spec: LayerSpec
    layer: nn.Module
    uploaded: bool  # created through the admin API (not the catalog's)


def encode_snapshot(seq: int, entries: dict[str, Entry], deleted: Iterable[str],
                    keys: list[tuple[str, Applied]]) -> bytes:
    layers, tensors = snapshot_layers((name, e.spec, e.layer, e.uploaded)
                                      for name, e in entries.items())
    recorded = [[k, e.layer, e.digest, e.num_batches_tracked] for k, e in keys]
    meta = {"format": FORMAT, "seq": seq, "layers": layers, "keys": recorded,
            "deleted": sorted(deleted)}
    return encode_record(meta, tensors)


def decode_snapshot(body: bytes | None, specs: list[LayerSpec], keys: KeyWindow
                    ) -> tuple[int, dict[str, Entry], set[str]]:
    """(its log position, every layer to serve, the catalog layers deleted): the catalog
    ``specs`` with the snapshot over them; its request_ids go into ``keys``."""
    entries = {s.name: Entry(s, s.build(torch.device("cpu")), False) for s in specs}
    if body is None:
        return 0, entries, set()
    source = "the state database's snapshot"
    meta, tensors = decode_record(body, source)
    if meta.get("format") != FORMAT:
        raise StateFileError(f"{source}: unknown format {meta.get('format')!r}")
    try:
        deleted = set(meta["deleted"]) & set(entries)
        for name in deleted:
            del entries[name]
        for layer in meta["layers"]:
            name = layer["name"]
            state = pick(tensors, f"{name}/state/")
            if layer["uploaded"]:
                spec = origin_spec(name, layer, pick(tensors, f"{name}/origin/"))
                entries[name] = Entry(spec, build(spec, state, source), True)
            elif name in entries:
                entries[name].layer = build(entries[name].spec, state, source)
        for key, name, digest, count in meta["keys"]:
            keys.fold(key, Applied(name, digest, count, recorded=True))
        return int(meta["seq"]), entries, deleted
    except (KeyError, TypeError, ValueError) as exc:
        raise StateFileError(f"{source}: malformed ({exc!r})") from None

