"""Changes of served state, and the one interface through which the store persists them.

The store tells a ``ChangeLog`` about every change (a train step, a reset, an uploaded
state, a layer put or deleted) and waits until the log says its record is safe before it
answers. A log is given to the store when the store is made (``Store(log=...)``), and the
store calls it; a log never calls into the store, except through the one callback the
store hands it at load (``follow``).

Two kinds of log:

- a **private** log (``shared = False``: the embedded journal, ``service.state.persistence``)
  serves one process. The store orders changes under its locks, records each one before
  it is served, and serves it once the record is safe.
- a **shared** log (``shared = True``: a database several replicas write to,
  ``service.state.shared``) orders the changes itself. The store records what a change
  adds (a train step: its batch statistics and count, ``StepDelta``), and every replica,
  the one that took the step included, applies the committed changes in the log's order
  through the callback given to ``follow``. The waiter of a recorded change returns what
  that callback returned for it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import nn

from ..core.catalog import LayerSpec
from ..core.errors import ConflictError
from .idempotency import Applied, KeyWindow

GROUP_WINDOW = 0.002  # seconds: see GroupPacer

# True while a caller on an event loop starts a change that it will await on that loop and
# never block on (``Engine.start_train``): a log may then settle the change's waiter on that
# loop, one call for a whole group (the journal does). Blocking on such a waiter on the
# loop's own thread would wait forever.
AWAITED_ON_LOOP: ContextVar[bool] = ContextVar("awaited_on_loop", default=False)


class GroupPacer:
    """Paces a shared log's group commits. Under concurrent load (the last group held
    several changes) the next group gathers until ``GROUP_WINDOW`` after the previous write
    ends: each database transaction costs far more CPU than the changes it carries. A lone
    client never waits."""

    def __init__(self) -> None:
        self._end, self._size = 0.0, 0

    def wait(self) -> None:
        if self._size > 1:
            delay = self._end + GROUP_WINDOW - time.monotonic()
            if delay > 0:  # (a sleep of 0 still hands the interpreter lock over)
                time.sleep(delay)

    def wrote(self, size: int) -> None:
        self._end, self._size = time.monotonic(), size


# Settles once a change's record is safe, failed (``UnavailableError``) if it cannot be.
# With a shared log its result is the change's ``Folded`` once this replica has applied it.
Waiter = Future


@dataclass(frozen=True)
class StepDelta:
    """What one train step adds to a layer's running statistics: the batch's per-channel
    mean and biased variance over ``count`` values each (see ``service.state.folding``)."""

    mean: torch.Tensor
    var: torch.Tensor
    count: int


@dataclass(frozen=True)
class Change:
    """One change of served state, as a log records it."""

    op: Literal["train", "reset", "load_state", "put", "delete"]
    name: str
    layer: nn.Module | None = None  # as it will be served; None for delete (and shared train)
    spec: LayerSpec | None = None  # put: what the layer resets to
    key: str | None = None  # train with a request_id: the key ...
    applied: Applied | None = None  # ... and what a retry of it is answered from
    delta: StepDelta | None = None  # shared train: what the step adds


@dataclass(frozen=True)
class Folded:
    """What applying one committed change did (shared logs): the layer it was applied to,
    the layer served after it (None: deleted, or a step that did not fit), the spec the
    name is served with, and the num_batches_tracked after it."""

    base: nn.Module | None
    layer: nn.Module | None
    spec: LayerSpec | None
    num_batches_tracked: int | None = None


# The store's callback for a shared log: apply one committed change, in the log's order.
Apply = Callable[[Change], Folded]


class KeyTakenError(ConflictError):
    """A shared log found the request_id already committed (by this or another replica);
    the change was not recorded again. The committed step has been applied here before
    this is raised, so the store's key window answers a retry from it."""

    def __init__(self, key: str) -> None:
        super().__init__(f"request_id {key!r} was applied too long ago to be answered again")
        self.key = key


class ChangeLog(Protocol):
    """Where the store's changes go to survive the process."""

    shared: bool  # True: the log orders changes and the store applies them via ``follow``

    @property
    def status(self) -> str:
        """"durable", "starting" until restored, else why changes are refused."""
        ...

    def restore(self, specs: list[LayerSpec], keys: KeyWindow) -> list[tuple[LayerSpec,
                                                                          nn.Module]]:
        """The layers to serve: ``specs`` with the saved state over them, plus the layers
        created since. Saved request_ids go into ``keys``, which the log may mark as
        recorded from then on (see ``KeyWindow.mark_recorded``). Changes are refused
        before this returns."""
        ...

    def follow(self, apply: Apply) -> None:
        """Shared logs: apply every change committed since ``restore`` through ``apply``,
        then keep doing so, in the log's order, until closed. Private logs ignore it."""
        ...

    def record(self, change: Change) -> Waiter | None:
        """Record ``change`` (a private log: called under the lock that orders it); return
        the future that settles when it is safe, or None if it already is. Raises if it
        cannot be recorded.

        A failure is final: once a record or a waiter has failed, every later ``record``
        raises, so the store may drop the steps that were not yet safe."""
        ...

    def close(self) -> None:
        """Make everything recorded safe; later changes are refused."""
        ...
