"""Named layers, their locks and their persistence. Only the store mutates layer state.

Train steps are copy-on-write: under the layer's lock, a private copy of the newest layer
takes the step and the step is recorded; once its record is safe, the copy replaces the
served layer in one reference swap. Eval requests read whichever layer is served without
locking, so they run concurrently, never switch a shared module between modes, and never
see a half-applied update or one that could still be lost; a rejected step leaves the
served layer exactly as it was. A layer object, once made, is never modified again, so the
journal may keep and read it.

One rule for every change: a reply of success means applied and safe; an error means not
applied, now or later. A step that cannot start before its deadline is refused; a step
that has started is finished and answered. If the log cannot make a record safe, the steps
not yet safe are dropped (the log refuses changes from then on).

Every change (train step, reset, uploaded state, layer put or deleted) goes to the store's
``ChangeLog`` (``service.state.changes``), if it has one, as a ``Change`` before it is
served, in the order the changes apply, and the reply waits until the log says the record
is safe.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from normcore.checkpoint import layer_state_bytes, load_layer_state
from normcore.functional import Normalized, RMSNormalized, batch_norm_stats

from ..core.catalog import LayerSpec
from ..core.drift import Drift
from ..core.errors import LayerNotFoundError, RequestTimeoutError
from .changes import Change, ChangeLog, Waiter
from .drift import DriftMonitor
from .idempotency import Applied, KeyWindow, input_digest


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
    drift: DriftMonitor = field(init=False)

    def __post_init__(self) -> None:
        self.head = self.layer
        self.drift = DriftMonitor(self.spec.name, self.spec.kind, self.spec.drift_threshold)

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


@dataclass(frozen=True)
class Outcome:
    """What one normalize call produced."""

    output: torch.Tensor
    stats: dict[str, torch.Tensor]  # mean/var, or mean_square for RMSNorm
    num_batches_tracked: int | None = None  # after a train step on a layer that counts them
    drift: Drift | None = None  # of an eval batch

    @classmethod
    def of(cls, result: Normalized | RMSNormalized, count: int | None = None,
           drift: Drift | None = None) -> Outcome:
        stats = result._asdict()
        return cls(stats.pop("output"), stats, count, drift)


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

    def __init__(self, default_device: torch.device, *, log: ChangeLog | None = None,
                 reject_non_finite: bool = True, idempotency_window: int = 10_000) -> None:
        self.default_device = default_device
        self.reject_non_finite = reject_non_finite
        self._slots: dict[str, Slot] = {}
        self._admin = threading.Lock()  # serializes adding, replacing and removing layers
        self._log = log
        self.applied = KeyWindow(idempotency_window)  # request_id -> what it applied

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

    @property
    def persistence(self) -> str:
        """"memory" without a change log, else the log's status ("durable" or why not)."""
        return "memory" if self._log is None else self._log.status

    def _record(self, change: Change) -> Waiter | None:
        return self._log.record(change) if self._log is not None else None

    def load(self, specs: list[LayerSpec]) -> None:
        """Serve ``specs`` at start, with the change log's saved state over them."""
        if self._log is None:
            for spec in specs:
                self.put(spec, record=False)
            return
        for spec, layer in self._log.restore(specs, self.applied):
            self.put(spec, layer, record=False)

    def close(self) -> None:
        """Make every change safe (at a graceful stop); later changes are refused."""
        if self._log is not None:
            self._log.close()

    def _acquire(self, name: str, deadline: float | None = None) -> Slot:
        """The layer's current slot, its lock held (released by the caller);
        ``RequestTimeoutError`` if the lock is not had by ``deadline`` (time.monotonic)."""
        while True:
            slot = self.slot(name)
            timeout = _timeout(deadline)
            if not slot.lock.acquire(timeout=-1 if timeout is None else timeout):
                raise RequestTimeoutError
            if not slot.retired:
                return slot
            slot.lock.release()  # replaced or deleted while we waited: look again

    def device_for(self, spec: LayerSpec) -> torch.device:
        return torch.device(spec.device) if spec.device else self.default_device

    def _serve(self, layer: nn.Module, device: torch.device) -> nn.Module:
        layer = layer.to(device).eval()
        if hasattr(layer, "reject_non_finite"):
            layer.reject_non_finite = self.reject_non_finite
        return layer

    # --- layers -------------------------------------------------------------------------

    def put(self, spec: LayerSpec, layer: nn.Module | None = None, *,
            record: bool = True) -> Slot:
        """Serve ``spec`` (built from its checkpoint unless ``layer`` is given).

        ``record=False`` is for layers that come from the catalog or the change log at
        start (``load``), which the log already knows.
        """
        device = self.device_for(spec)
        layer = self._serve(layer if layer is not None else spec.build(device), device)
        slot = Slot(spec, layer, device)
        with self._admin:
            old = self._slots.get(spec.name)
            # The old slot's lock orders the put after any step already under way on it;
            # admin changes are rare, so they hold it until their record is safe.
            with old.lock if old is not None else nullcontext():
                if record:
                    _wait(self._record(Change("put", spec.name, layer, spec=spec)))
                if old is not None:
                    old.retired = True
                self._slots[spec.name] = slot
        return slot

    def delete(self, name: str) -> None:
        with self._admin:
            slot = self.slot(name)
            with slot.lock:
                _wait(self._record(Change("delete", name)))
                slot.retired = True
                del self._slots[name]

    def reset(self, name: str) -> Slot:
        """Back to the checkpoint's statistics (torch's defaults without one)."""
        return self._replace(name, "reset",
                             lambda slot: self._serve(slot.spec.build(slot.device), slot.device))

    def load_state(self, name: str, state: dict[str, torch.Tensor]) -> Slot:
        """Replace the layer's state with checked values from ``state`` (torch.nn keys)."""

        def loaded(slot: Slot) -> nn.Module:
            # A full copy, not a fork: the upload may replace weight and bias, which a fork
            # shares with the layer being served (and with the journal's view of it).
            layer = copy.deepcopy(slot.head)
            load_layer_state(layer, state, source="uploaded state")
            return layer

        return self._replace(name, "load_state", loaded)

    def _replace(self, name: str, change: str, make: Callable[[Slot], nn.Module]) -> Slot:
        """Serve ``make(slot)`` instead of the layer, recorded, under the layer's lock."""
        slot = self._acquire(name)
        try:
            layer = make(slot)
            # Held until safe: the record covers any earlier steps still on their way.
            _wait(self._record(Change(change, name, layer)))
            slot.recorded += 1
            slot.layer = slot.head = layer
            slot.published = slot.recorded
            slot.last_update = time.time()
        finally:
            slot.lock.release()
        return slot

    def export(self, name: str) -> bytes:
        """The layer's current state as safetensors bytes."""
        return layer_state_bytes(self.slot(name).layer)

    # --- steps --------------------------------------------------------------------------

    def evaluate(self, name: str, x: torch.Tensor, deadline: float | None = None) -> Outcome:
        """Normalize with the served layer in eval mode; changes nothing."""
        _check_deadline(deadline)
        slot = self.slot(name)
        served = slot.layer  # one read: a concurrent train step swaps, never edits, it
        layer = _computing_copy(served, x) or served
        x = x.to(slot.device)
        with torch.inference_mode():
            result = layer.normalize(x, train=False)
            drift = slot.drift.observe(served, x, result)
        slot.requests["eval"] += 1
        return Outcome.of(result, drift=drift)

    def evaluate_many(self, name: str, xs: list[torch.Tensor]) -> list[Outcome]:
        """``evaluate`` for several inputs that differ only in dim 0, in one layer call.

        Outputs are exact either way: eval mode normalizes each sample on its own (or with
        the running statistics). Per-sample statistics are split along dim 0; BatchNorm's
        batch statistics belong to each request's own batch, so they are computed per input.
        """
        slot = self.slot(name)
        layer = slot.layer
        xs = [t.to(slot.device) for t in xs]
        x = torch.cat(xs)
        with torch.inference_mode():
            if slot.spec.kind.startswith("BatchNorm"):
                outputs = layer(x).split([len(t) for t in xs])
                results = [Normalized(out, *batch_norm_stats(t))
                           for out, t in zip(outputs, xs, strict=True)]
            else:
                merged = layer.normalize(x, train=False)
                parts = [value.split([len(t) for t in xs]) for value in merged]
                results = [type(merged)(*values) for values in zip(*parts, strict=True)]
            drifts = [slot.drift.observe(layer, t, result)
                      for t, result in zip(xs, results, strict=True)]
        slot.requests["eval"] += len(xs)
        return [Outcome.of(result, drift=drift)
                for result, drift in zip(results, drifts, strict=True)]

    def train(self, name: str, x: torch.Tensor, request_id: str | None = None,
              deadline: float | None = None) -> Outcome:
        """Take one train step on the layer; raises (changing nothing) if it is rejected,
        cannot start by ``deadline`` (time.monotonic), or cannot be made safe.

        With a ``request_id`` seen before (same layer, same tensor), the step is not taken
        again: the answer is recomputed from ``x`` and the count the first step produced.
        ``IdempotencyConflictError`` if the id came with another tensor or layer.
        """
        digest = input_digest(x) if request_id is not None else None
        while request_id is not None:
            prior = self.applied.claim(request_id, name, digest)
            if prior is None:
                break  # the key is ours: take the step
            prior.check(request_id, name, digest)
            if not prior.done.wait(_timeout(deadline)):
                raise RequestTimeoutError
            if prior.settled:  # applied and safe
                return self._answer_retry(name, x, prior)
            # the first attempt was refused, so nothing was applied: claim the key again
        try:
            outcome = self._step(name, x, request_id, digest, deadline)
        except BaseException:
            if request_id is not None:
                self.applied.release(request_id)
            raise
        if request_id is not None:
            self.applied.settle(request_id, outcome.num_batches_tracked)
        return outcome

    def _step(self, name: str, x: torch.Tensor, request_id: str | None, digest: str | None,
              deadline: float | None) -> Outcome:
        slot = self._acquire(name, deadline)
        try:
            wide = _computing_copy(slot.head, x)
            layer = wide if wide is not None else fork(slot.head)
            try:
                with torch.inference_mode():
                    result = layer.normalize(x.to(slot.device), train=True)
                if wide is not None:
                    layer = _restore_dtype(layer, slot.head)
            except Exception:
                slot.rejected += 1
                raise
            count = num_batches(layer)
            applied = None if digest is None else Applied(name, digest, count)
            wait = self._record(Change("train", name, layer, key=request_id, applied=applied))
            slot.recorded += 1
            slot.head, seq = layer, slot.recorded
        finally:
            slot.lock.release()
        # The next step on this layer may start while this one's record is made safe
        # (group commit); eval keeps the served layer until then.
        if wait is not None:
            try:
                wait()
            except BaseException:
                slot.drop_unsafe()
                raise
        slot.publish(seq, layer)
        slot.requests["train"] += 1
        return Outcome.of(result, count)

    def _answer_retry(self, name: str, x: torch.Tensor, prior: Applied) -> Outcome:
        slot = self.slot(name)
        # A private copy takes the step and is dropped.
        layer = _computing_copy(slot.layer, x) or fork(slot.layer)
        with torch.inference_mode():
            result = layer.normalize(x.to(slot.device), train=True)
        return Outcome.of(result, prior.num_batches_tracked)


def _wait(wait: Waiter | None) -> None:
    if wait is not None:
        wait()


def _timeout(deadline: float | None) -> float | None:
    """Seconds left until ``deadline`` (None: no deadline)."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _check_deadline(deadline: float | None) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise RequestTimeoutError
