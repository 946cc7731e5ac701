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
from .drift import DriftMonitor


@dataclass
class Slot:
    """One served layer and what is known about it."""

    spec: LayerSpec
    layer: nn.Module  # served: every change up to ``published`` is in it, and safe
    device: torch.device
    lock: threading.Lock = field(default_factory=threading.Lock)  # orders steps and changes
    # Guards the swaps of layer/head and their numbers. Held only for those assignments, so
    # a step that becomes safe never waits for another step's computation under ``lock``.
    swap: threading.Lock = field(default_factory=threading.Lock)
    requests: dict[str, int] = field(default_factory=lambda: {"eval": 0, "train": 0})
    rejected: int = 0
    last_update: float | None = None
    retired: bool = False  # replaced or deleted: steps must look the name up again
    head: nn.Module | None = None  # the newest layer, with steps recorded but not yet safe
    recorded: int = 0  # changes recorded on this slot (numbers them)
    head_seq: int = 0  # the change ``head`` is the result of
    published: int = 0  # the change ``layer`` is the result of
    version: int = 1  # counts the layers put under this name since the store started
    loaded: bool = True  # unloaded: kept with its state, but not served
    compute_ns: int = 0  # time spent normalizing, for the statistics
    last_inference: float | None = None  # seconds since the epoch
    drift: DriftMonitor = field(init=False)

    def __post_init__(self) -> None:
        self.head = self.layer
        self.drift = DriftMonitor(self.spec.name, self.spec.kind, self.spec.drift_threshold)

    def advance(self, layer: nn.Module) -> int:
        """Record ``layer`` as the newest (under ``lock``): the next step starts from it.
        Returns its change number."""
        with self.swap:
            self.recorded += 1
            self.head, self.head_seq = layer, self.recorded
            return self.recorded

    def replace(self, layer: nn.Module) -> None:
        """Serve ``layer`` now, as the newest (an admin change, safe, under ``lock``)."""
        with self.swap:
            self.recorded += 1
            self.layer = self.head = layer
            self.published = self.head_seq = self.recorded
            self.last_update = time.time()

    def publish(self, seq: int, layer: nn.Module) -> None:
        """Serve ``layer``, change ``seq`` of this slot, once its record is safe; a later
        change published first covers it (the log makes records safe in order)."""
        with self.swap:
            if seq > self.published:
                self.layer, self.published = layer, seq
                self.last_update = time.time()
            if seq > self.head_seq:  # steps dropped meanwhile had pointed head back
                self.head, self.head_seq = layer, seq

    def count(self, mode: str, ns: int, requests: int = 1) -> None:
        """Count served requests and their compute time. Statistics, not state: unlocked, so
        concurrent counts may rarely be lost."""
        self.requests[mode] += requests
        self.compute_ns += ns
        self.last_inference = time.time()

    def drop_unsafe(self) -> None:
        """A record could not be made safe: the steps after the served layer are dropped
        (the log refuses every change after such a failure)."""
        with self.swap:
            self.head, self.head_seq = self.layer, self.published


def wait_for(wait: Waiter | None) -> None:
    if wait is not None:
        wait.result()


def time_left(deadline: float | None) -> float | None:
    """Seconds left until ``deadline`` (None: no deadline)."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def check_deadline(deadline: float | None) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise RequestTimeoutError
