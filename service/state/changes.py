"""Changes of served state, and the one interface through which the store persists them.

The store tells a ``ChangeLog`` about every change (a train step, a reset, an uploaded
state, a layer put or deleted) under the lock that orders it, before the change is served,
and waits until the log says its record is safe before it answers. A log is given to the
store when the store is made (``Store(log=...)``), and the store calls it; a log never
calls the store. The embedded journal (``service.state.persistence``) is one such log;
other backends plug in the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from torch import nn

from ..core.catalog import LayerSpec
from .idempotency import Applied, KeyWindow

# Blocks until a change's record is safe; raises (``UnavailableError``) if it cannot be.
Waiter = Callable[[], None]


@dataclass(frozen=True)
class Change:
    """One change of served state, as a log records it."""

    op: Literal["train", "reset", "load_state", "put", "delete"]
    name: str
    layer: nn.Module | None = None  # as it will be served; None for delete
    spec: LayerSpec | None = None  # put: what the layer resets to
    key: str | None = None  # train with a request_id: the key ...
    applied: Applied | None = None  # ... and what a retry of it is answered from


class ChangeLog(Protocol):
    """Where the store's changes go to survive the process."""

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

    def record(self, change: Change) -> Waiter | None:
        """Record ``change`` (called under the lock that orders it); return what waits
        until it is safe, or None if it already is. Raises if it cannot be recorded.

        A failure is final: once a record or a waiter has failed, every later ``record``
        raises, so the store may drop the steps that were not yet safe."""
        ...

    def close(self) -> None:
        """Make everything recorded safe; later changes are refused."""
        ...
