"""Idempotency keys: a train request that carries a ``request_id`` is applied at most once.

A train step's output is a deterministic function of its input and the layer's weight
and bias (it normalizes with the batch's own statistics), so a key needs to remember only
which layer took the step, a digest of the input, and the ``num_batches_tracked`` that the
step produced. A retry with the same key and the same input is answered by normalizing the
input again without updating anything; the same key with another input or layer is a
conflict. Keys are kept for a bounded window (the most recent ``size`` keys); a key whose
step is still under way is never evicted, so a retry waiting on it cannot apply it again.

One window per store. A change log marks the keys whose steps it has recorded, so that a
snapshot it writes holds exactly the keys of the steps it covers.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..core.errors import ConflictError, shown


class IdempotencyConflictError(ConflictError):
    """A request_id that was already used for another input or layer."""


def input_digest(x: torch.Tensor) -> str:
    """A digest of the tensor's dtype, shape and bytes (hex, 128 bits)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{x.dtype}|{list(x.shape)}|".encode())
    flat = x.detach().reshape(-1).contiguous().cpu()
    if flat.numel():
        h.update(flat.view(torch.uint8).numpy().data)
    return h.hexdigest()


@dataclass
class Applied:
    """What a retry of one key is answered from."""

    layer: str
    digest: str
    num_batches_tracked: int | None = None
    settled: bool = True  # False while the step that reserved the key is still running
    recorded: bool = False  # the change log holds the step's record
    # Set once the step is settled (taken or refused); until then a retry waits on it.
    done: threading.Event = field(default_factory=threading.Event, repr=False, compare=False)

    def check(self, key: str, layer: str, digest: str) -> None:
        if layer != self.layer:
            raise IdempotencyConflictError(
                f"request_id '{shown(key)}' was already used for layer '{self.layer}'")
        if digest != self.digest:
            raise IdempotencyConflictError(
                f"request_id '{shown(key)}' was already used with a different tensor")


class KeyWindow:
    """The most recent ``size`` keys and what they applied; safe to share between threads."""

    MAX_KEY = 128  # characters in one key

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[str, Applied] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[tuple[str, Applied]]:
        with self._lock:
            return iter(list(self._entries.items()))

    def get(self, key: str) -> Applied | None:
        return self._entries.get(key)

    def claim(self, key: str, layer: str, digest: str) -> Applied | None:
        """Reserve ``key`` for a new step and return None, or return the entry that holds it.

        Check-and-reserve is one step, so two requests with one key never both apply.
        """
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                return entry
            self._entries[key] = Applied(layer, digest, settled=False)
            self._evict()
            return None

    def settle(self, key: str, num_batches_tracked: int | None) -> None:
        """The reserved step was taken and is safe: retries may now be answered."""
        entry = self._entries.get(key)
        if entry is not None:
            entry.num_batches_tracked = num_batches_tracked
            entry.settled = True
            entry.done.set()

    def mark_recorded(self, key: str, num_batches_tracked: int | None) -> None:
        """The change log has recorded the step that holds ``key`` (under its own lock)."""
        entry = self._entries.get(key)
        if entry is not None:
            entry.num_batches_tracked = num_batches_tracked
            entry.recorded = True

    def recorded(self) -> list[tuple[str, Applied]]:
        """The keys whose steps the change log has recorded, oldest first."""
        with self._lock:
            return [(k, e) for k, e in self._entries.items() if e.recorded]

    def release(self, key: str) -> None:
        """The reserved step was refused: forget the key (a retry may apply it). A key that
        a shared log has meanwhile settled (committed elsewhere) stays."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.settled:
                return
            del self._entries[key]
        entry.done.set()

    def fold(self, key: str, entry: Applied) -> None:
        """A shared log committed a step with ``key``: remember what it applied, settling
        any attempt of this process that holds the key (its own record would conflict)."""
        with self._lock:
            held = self._entries.get(key)
            if held is None:
                self._entries[key] = entry
                self._evict()
            else:
                held.layer, held.digest = entry.layer, entry.digest
                held.num_batches_tracked = entry.num_batches_tracked
                held.settled = held.recorded = True
                entry = held
        entry.done.set()

    def add(self, key: str, entry: Applied) -> None:
        """Remember a settled entry (one restored from disk)."""
        entry.done.set()
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            self._evict()

    def _evict(self) -> None:
        excess = len(self._entries) - self.size
        if excess <= 0:
            return
        # The oldest settled keys go; keys in flight stay until their step settles.
        victims = []
        for key, entry in self._entries.items():  # oldest first: usually the first ones
            if entry.settled:
                victims.append(key)
                if len(victims) == excess:
                    break
        for key in victims:
            self._entries.pop(key).done.set()
