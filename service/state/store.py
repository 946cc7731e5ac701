"""Named layers, their locks and their persistence. Only the store mutates layer state.

Train steps are copy-on-write: a private copy of the newest layer takes the step under the
layer's lock; once its record is safe, it replaces the served layer in one reference swap.
Eval requests read the served layer without locking: they run concurrently and never see a
half-applied or unsafe update. A layer object, once made, is never modified again.

One rule for every change: success means applied and safe; an error means not applied, now
or later. A step that cannot start by its deadline is refused; a started one is finished.
Every change goes to the store's ``ChangeLog`` (``service.state.changes``), if it has one,
before it is served, and the reply waits until the log says it is safe; if the log cannot
make it safe, the steps not yet safe are dropped. A shared log (replicas on one database)
orders changes itself: a step is recorded as what it adds (``StepDelta``) and served, on
every replica, when the log hands it back in commit order (``_apply``).
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import nullcontext

import torch
from torch import nn

from normcore.checkpoint import layer_state_bytes, load_layer_state

from ..core.catalog import LayerSpec
from ..core.errors import ConflictError, KeyInFlightError, LayerNotFoundError, RequestTimeoutError
from .changes import Change, ChangeLog, Folded, KeyTakenError, Waiter
from .evaluation import evaluate, evaluate_many
from .idempotency import Applied, KeyWindow, input_digest
from .slot import Slot, check_deadline, time_left, wait_for
from .steps import (
    Outcome,
    after,
    answer_again,
    check_delta_fits,
    check_stored,
    computing_copy,
    fold_step,
    fork,
    num_batches,
    restore_dtype,
    same_parameters,
    settled,
    step_delta,
)

__all__ = ["Outcome", "Slot", "Store", "num_batches"]


class Store:
    """The served layers by name."""

    def __init__(self, default_device: torch.device, *, log: ChangeLog | None = None,
                 reject_non_finite: bool = True, idempotency_window: int = 10_000) -> None:
        self.default_device = default_device
        self.reject_non_finite = reject_non_finite
        self._slots: dict[str, Slot] = {}
        self._admin = threading.Lock()  # serializes adding, replacing and removing layers
        self._log = log
        self._shared = log is not None and log.shared  # the log orders; _apply serves
        self.applied = KeyWindow(idempotency_window)  # request_id -> what it applied
        self._versions: dict[str, int] = {}  # name -> its newest slot's version

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

    def _commit(self, change: Change) -> Folded:
        """Shared log: record ``change`` and wait until it is committed and served here."""
        return self._log.record(change).result()

    def load(self, specs: list[LayerSpec]) -> None:
        """Serve ``specs`` at start, with the change log's saved state over them."""
        if self._log is None:
            for spec in specs:
                self.put(spec, record=False)
            return
        for spec, layer in self._log.restore(specs, self.applied):
            self.put(spec, layer, record=False)
        self._log.follow(self._apply)  # a shared log catches up, then keeps us current

    def close(self) -> None:
        """Make every change safe (at a graceful stop); later changes are refused."""
        if self._log is not None:
            self._log.close()

    def _acquire(self, name: str, deadline: float | None = None) -> Slot:
        """The layer's current slot, its lock held (released by the caller);
        ``RequestTimeoutError`` if the lock is not had by ``deadline`` (time.monotonic)."""
        while True:
            slot = self.slot(name)
            timeout = time_left(deadline)
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
        if self._shared and record:
            self._commit(Change("put", spec.name, layer, spec=spec))
            return self.slot(spec.name)
        slot = Slot(spec, layer, device)
        with self._admin:
            self._versions[spec.name] = slot.version = self._versions.get(spec.name, 0) + 1
            old = self._slots.get(spec.name)
            # The old slot's lock orders the put after any step already under way on it;
            # admin changes are rare, so they hold it until their record is safe.
            with old.lock if old is not None else nullcontext():
                if record:
                    wait_for(self._record(Change("put", spec.name, layer, spec=spec)))
                if old is not None:
                    old.retired = True
                self._slots[spec.name] = slot
        return slot

    def set_loaded(self, name: str, loaded: bool) -> Slot:
        """Serve the layer again, or stop serving it and keep it as it is. Not a change of
        state: not recorded, and every layer is loaded after a restart."""
        with self._admin:
            slot = self.slot(name)
            slot.loaded = loaded
        return slot

    def delete(self, name: str) -> None:
        if self._shared:
            self.slot(name)
            self._commit(Change("delete", name))
            return
        with self._admin:
            slot = self.slot(name)
            with slot.lock:
                wait_for(self._record(Change("delete", name)))
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
        if self._shared:
            self._commit(Change(change, name, make(self.slot(name))))
            return self.slot(name)
        slot = self._acquire(name)
        try:
            layer = make(slot)
            # Held until safe: the record covers any earlier steps still on their way.
            wait_for(self._record(Change(change, name, layer)))
            slot.replace(layer)
        finally:
            slot.lock.release()
        return slot

    def export(self, name: str) -> bytes:
        """The layer's current state as safetensors bytes."""
        return layer_state_bytes(self.slot(name).layer)

    # --- steps --------------------------------------------------------------------------

    def evaluate(self, name: str, x: torch.Tensor, deadline: float | None = None) -> Outcome:
        """Normalize with the served layer in eval mode; changes nothing."""
        check_deadline(deadline)
        return evaluate(self.slot(name), x)

    def evaluate_many(self, name: str, xs: list[torch.Tensor]) -> list[Outcome]:
        """``evaluate`` for several inputs that differ only in dim 0, in one layer call."""
        return evaluate_many(self.slot(name), xs)

    def train(self, name: str, x: torch.Tensor, request_id: str | None = None,
              deadline: float | None = None) -> Outcome:
        """Take one train step on the layer; raises (changing nothing) if it is rejected,
        cannot start by ``deadline`` (time.monotonic), or cannot be made safe.

        With a ``request_id`` seen before (same layer, same tensor), the step is not taken
        again: the answer is recomputed from ``x`` and the count the first step produced.
        ``IdempotencyConflictError`` if the id came with another tensor or layer.
        """
        return self.start_train(name, x, request_id, deadline).result()

    def start_train(self, name: str, x: torch.Tensor, request_id: str | None = None,
                    deadline: float | None = None) -> Future:
        """``train`` as a future: the step is taken now, or refused (raises), and the future
        settles with its ``Outcome`` once the step is safe (at once without a change log)."""
        digest = input_digest(x) if request_id is not None else None
        while request_id is not None:
            prior = self.applied.claim(request_id, name, digest)
            if prior is None:
                break  # the key is ours: take the step
            prior.check(request_id, name, digest)
            if not prior.done.wait(time_left(deadline)):
                raise KeyInFlightError(request_id)
            if prior.settled:  # applied and safe
                prior.check(request_id, name, digest)  # a shared log may have settled it
                return settled(answer_again(self.slot(name), x, prior.num_batches_tracked))
            # the first attempt was refused, so nothing was applied: claim the key again
        step = self._step_shared if self._shared else self._step
        try:
            taken = step(name, x, request_id, digest, deadline)
        except BaseException:
            if request_id is not None:
                self.applied.release(request_id)
            raise
        return taken if request_id is None else after(taken, lambda: self._settle_key(
            taken, name, x, request_id, digest))

    def _settle_key(self, taken: Future, name: str, x: torch.Tensor, request_id: str,
                    digest: str) -> Outcome:
        """The outcome of a step with a request_id, its key settled or released."""
        try:
            outcome = taken.result()
        except KeyTakenError:  # committed before, maybe by another replica: answer from it
            self.applied.release(request_id)
            prior = self.applied.get(request_id)
            if prior is None or not prior.settled:
                raise
            prior.check(request_id, name, digest)
            return answer_again(self.slot(name), x, prior.num_batches_tracked)
        except BaseException:
            self.applied.release(request_id)
            raise
        self.applied.settle(request_id, outcome.num_batches_tracked)
        return outcome

    def _step(self, name: str, x: torch.Tensor, request_id: str | None, digest: str | None,
              deadline: float | None) -> Future:
        slot = self._acquire(name, deadline)
        try:
            wide = computing_copy(slot.head, x)
            layer = wide if wide is not None else fork(slot.head)
            start = time.perf_counter_ns()
            try:
                with torch.inference_mode():
                    result = layer.normalize(x.to(slot.device), train=True)
                if wide is not None:
                    layer = restore_dtype(layer, slot.head)
                    if self.reject_non_finite:
                        check_stored(layer)
            except Exception:
                slot.rejected += 1
                raise
            elapsed = time.perf_counter_ns() - start
            count = num_batches(layer)
            applied = None if digest is None else Applied(name, digest, count)
            wait = self._record(Change("train", name, layer, key=request_id, applied=applied))
            seq = slot.advance(layer)
        finally:
            slot.lock.release()

        # The next step on this layer may start while this one's record is made safe
        # (group commit); eval keeps the served layer until then.
        def safe() -> Outcome:
            if wait is not None:
                try:
                    wait.result()
                except BaseException:
                    slot.drop_unsafe()
                    raise
            slot.publish(seq, layer)
            slot.count("train", elapsed)
            return Outcome.of(result, count)

        return after(wait, safe)

    def _step_shared(self, name: str, x: torch.Tensor, request_id: str | None,
                     digest: str | None, deadline: float | None) -> Future:
        """A train step through a shared log: computed here on a private copy, applied when
        the log hands it back in commit order (``_apply``), on every replica alike. It
        waits for no lock, so it starts at once, whatever the ``deadline``."""
        slot = self.slot(name)
        served = slot.layer
        layer = computing_copy(served, x) or fork(served)
        try:
            with torch.inference_mode():
                result = layer.normalize(x.to(slot.device), train=True)
            delta = step_delta(layer, x, result)
            if self.reject_non_finite:
                check_delta_fits(delta, served)
        except Exception:
            slot.rejected += 1
            raise
        if delta is None and request_id is None:  # no running statistics: nothing to keep
            slot.requests["train"] += 1
            return settled(Outcome.of(result, num_batches(served)))
        applied = None if digest is None else Applied(name, digest)
        committing = self._log.record(Change("train", name, key=request_id, applied=applied,
                                             delta=delta))

        def applied_here() -> Outcome:
            folded = committing.result()
            if folded.layer is None:
                raise ConflictError(f"layer {name!r} was replaced or deleted while the step "
                                    "was under way; nothing was applied")
            if same_parameters(folded.base, served):
                return Outcome.of(result, folded.num_batches_tracked)
            # Another replica uploaded a weight or bias first: the step's output is the one
            # the layer it was applied to gives.
            with torch.inference_mode():
                again = fork(folded.base).normalize(x.to(slot.device), train=True)
            return Outcome.of(again, folded.num_batches_tracked)

        return after(committing, applied_here)

    def _apply(self, change: Change) -> Folded:
        """Serve one change a shared log committed (this replica's or another's), in the
        log's order; called by the log's threads one at a time."""
        name = change.name
        if change.op in ("put", "delete"):
            return self._apply_admin(change)
        slot = self._slots.get(name)
        if slot is None:  # a layer this replica does not serve (not in its catalog)
            return Folded(None, None, None)
        base = slot.layer
        if change.op == "train":
            layer = base if change.delta is None else fold_step(base, change.delta)
            if layer is None:  # the step was taken on a layer since replaced: no-op
                return Folded(base, None, slot.spec)
            slot.requests["train"] += 1
        else:
            layer = self._serve(change.layer, slot.device)
        count = num_batches(layer)
        if change.key is not None and change.applied is not None:
            self.applied.fold(change.key, Applied(name, change.applied.digest, count,
                                                  recorded=True))
        slot.layer = slot.head = layer
        slot.last_update = time.time()
        return Folded(base, layer, slot.spec, count)

    def _apply_admin(self, change: Change) -> Folded:
        with self._admin:
            old = self._slots.pop(change.name, None)
            if old is not None:
                old.retired = True
            if change.op == "delete":
                return Folded(None if old is None else old.layer, None, None)
            device = self.device_for(change.spec)
            layer = self._serve(change.layer, device)
            self._slots[change.name] = Slot(change.spec, layer, device)
            return Folded(None, layer, change.spec, num_batches(layer))
