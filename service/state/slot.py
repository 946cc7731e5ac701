"""One served layer's slot in the store, and the store's small timing helpers."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.catalog import LayerSpec
from ..core.errors import RequestTimeoutError
from .changes import Waiter


@dataclass
class Slot:
    """One served layer and what is known about it."""

    spec: LayerSpec
    layer: nn.Module  # served: every change up to ``published`` is in it, and safe
    device: torch.device
    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: dict[str, int] = field(default_factory=lambda: {"eval": 0, "train": 0})
    rejected: int = 0
    last_update: float | None = None
    retired: bool = False  # replaced or deleted: steps must look the name up again
    head: nn.Module | None = None  # the newest layer, with steps recorded but not yet safe
    recorded: int = 0  # changes recorded on this slot
    published: int = 0  # the newest of them that is served

    def __post_init__(self) -> None:
        self.head = self.layer

    def publish(self, seq: int, layer: nn.Module) -> None:
        """Serve ``layer``, change ``seq`` of this slot, once its record is safe; a later
        change published first covers it (the log makes records safe in order)."""
        with self.lock:
            if seq > self.published:
                self.layer, self.published = layer, seq
                self.last_update = time.time()

    def drop_unsafe(self) -> None:
        """The log failed: steps after the served layer will never be safe."""
        with self.lock:
            self.head, self.recorded = self.layer, self.published


def wait_for(wait: Waiter | None) -> None:
    if wait is not None:
        wait()


def time_left(deadline: float | None) -> float | None:
    """Seconds left until ``deadline`` (None: no deadline)."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def check_deadline(deadline: float | None) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise RequestTimeoutError
