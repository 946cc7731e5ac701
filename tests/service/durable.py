"""A store over a state dir, for the tests of persistence and idempotency."""

from __future__ import annotations

from pathlib import Path

import torch

from service.core.catalog import LayerSpec
from service.state.persistence import Persistence
from service.state.store import Store

CPU = torch.device("cpu")


def open_store(folder: Path, specs: list[LayerSpec], **options) -> tuple[Store, Persistence]:
    """A store serving ``specs`` with ``folder`` as its state dir (restored first)."""
    window = options.pop("idempotency_window", 10_000)
    persistence = Persistence(folder, snapshot_every=options.pop("snapshot_every", 10**6),
                              **options)
    store = Store(CPU, log=persistence, idempotency_window=window)
    store.load(specs)
    return store, persistence
