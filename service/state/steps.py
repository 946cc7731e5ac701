"""The pieces of a train step: private copies of a layer, the step's outcome, and the step
as what it adds (``StepDelta``), folded into running statistics.

A shared log (``service.state.shared``) records a train step as its ``StepDelta`` — the
batch's per-channel mean, biased variance and the count of values behind them — rather
than the layer the step produced, so steps taken on different replicas can be applied in
the log's order on every replica. ``fold_step`` applies one with the very update a train
step runs (``normcore._stats.update_running``), with torch.nn's momentum rules:

    BatchNorm:     momentum, or 1 / num_batches_tracked (after counting it) for None;
                   num_batches_tracked += 1
    InstanceNorm:  momentum, or 0 for None (torch.nn leaves the statistics as they are);
                   the mean over the batch's instances of their statistics; never counted

so a layer that folds the deltas of a series of steps holds what one layer taking those
steps one at a time holds (to float32 rounding: the fused kernels update in C++).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass

import torch
from torch import nn

import normcore
from normcore._stats import update_running
from normcore.functional import Normalized, RMSNormalized

from ..core.drift import Drift
from .changes import StepDelta

_BATCH_NORMS = (normcore.BatchNorm1d, normcore.BatchNorm2d, normcore.BatchNorm3d)
_INSTANCE_NORMS = (normcore.InstanceNorm1d, normcore.InstanceNorm2d, normcore.InstanceNorm3d)
_NUMPY = {torch.float16, torch.float32, torch.float64}


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
    """A copy with its own buffers; parameters, which train steps never change, are shared.

    A shallow copy whose buffer dict holds clones (normcore layers keep no other state that
    a step changes, and have no submodules): a deepcopy costs ten times as much.
    """
    if layer._modules:
        return copy.deepcopy(layer, memo={id(p): p for p in layer.parameters()})
    # copy.copy and nn.Module.__setattr__, spelled out: a fork is made per train step, and
    # their generic paths cost more than the step itself on small tensors.
    new = object.__new__(type(layer))
    state = new.__dict__
    state.update(layer.__dict__)
    state["_buffers"] = {k: None if v is None else v.clone() for k, v in layer._buffers.items()}
    state["_parameters"] = dict(layer._parameters)
    return new


def num_batches(layer: nn.Module) -> int | None:
    count = getattr(layer, "num_batches_tracked", None)
    return None if count is None else int(count)


def computing_copy(layer: nn.Module, x: torch.Tensor) -> nn.Module | None:
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


def _state_dtype(layer: nn.Module) -> torch.dtype | None:
    return next((t.dtype for t in layer.state_dict().values() if t.is_floating_point()), None)


def restore_dtype(computed: nn.Module, like: nn.Module) -> nn.Module:
    dtype = _state_dtype(like)
    return computed if dtype is None else computed.to(dtype)


def _refuse_overflow(*stats: torch.Tensor) -> None:
    if not all(bool(torch.isfinite(s).all()) for s in stats):
        raise normcore.NonFiniteError(
            "the step's statistics overflow the layer's dtype (finite in float64, not in "
            "the layer's own); refusing to fold them into the running statistics")


def check_stored(layer: nn.Module) -> None:
    """Refuse a float64 step stored back in a float32 layer (``restore_dtype``) whose
    running statistics no longer fit: values within float64's range may lie beyond
    float32's, and Inf would then be served and persisted."""
    running = [getattr(layer, k, None) for k in ("running_mean", "running_var")]
    _refuse_overflow(*(t for t in running if t is not None))


def check_delta_fits(delta: StepDelta | None, layer: nn.Module) -> None:
    """``check_stored`` for a shared log's step, before it is recorded: the delta's
    statistics in the dtype every replica folds them into. (A fold is a weighted mean of
    the running statistics and these, so it stays finite when they are.)"""
    dtype = _state_dtype(layer)
    if delta is None or dtype is None:
        return
    unbiased = delta.var * (delta.count / max(delta.count - 1, 1))
    _refuse_overflow(delta.mean.to(dtype), unbiased.to(dtype))


def same_parameters(a: nn.Module, b: nn.Module) -> bool:
    """Whether two layers share their weight and bias (a fork and its origin do), so a
    train output computed with one is the other's."""
    return all(a._parameters.get(k) is b._parameters.get(k) for k in ("weight", "bias"))


def step_delta(layer: nn.Module, x: torch.Tensor, result: Normalized) -> StepDelta | None:
    """What the train step that gave ``result`` on input ``x`` adds to ``layer``'s running
    statistics; None for a layer that keeps none."""
    if getattr(layer, "running_mean", None) is None:
        return None
    if isinstance(layer, _BATCH_NORMS):
        return StepDelta(result.mean, result.var, x.numel() // x.size(1))
    if isinstance(layer, _INSTANCE_NORMS):
        mean, var = result.mean, result.var
        if mean.dim() == 1:  # an unbatched input: one instance
            mean, var = mean.unsqueeze(0), var.unsqueeze(0)
        return StepDelta(mean.mean(0), var.mean(0), x.numel() // mean.numel())
    return None


def fold_step(layer: nn.Module, delta: StepDelta) -> nn.Module | None:
    """A fork of ``layer`` with ``delta`` folded into its running statistics; None if the
    delta does not fit the layer (it was replaced by one of another width or kind)."""
    running_mean = getattr(layer, "running_mean", None)
    if running_mean is None or running_mean.numel() != delta.mean.numel():
        return None
    if not isinstance(layer, _BATCH_NORMS + _INSTANCE_NORMS):
        return None
    if running_mean.device.type == "cpu" and {running_mean.dtype, delta.var.dtype} <= _NUMPY:
        return _fold_in_numpy(layer, delta)
    new = fork(layer)
    device = running_mean.device
    mean, var = delta.mean.to(device), delta.var.to(device)
    with torch.inference_mode():
        if isinstance(new, _BATCH_NORMS):
            tracked = new.num_batches_tracked
            momentum = (new.momentum if new.momentum is not None
                        else 1.0 / float(tracked.item() + 1))
            update_running(new.running_mean, new.running_var, mean, var, delta.count, momentum)
            tracked.add_(1)
        else:
            momentum = new.momentum if new.momentum is not None else 0.0
            update_running(new.running_mean, new.running_var, mean, var, delta.count, momentum)
    return new


def _fold_in_numpy(layer: nn.Module, delta: StepDelta) -> nn.Module:
    """``fold_step`` for CPU buffers, in numpy: the same update, elementwise in the buffers'
    dtype, without torch's per-call dispatch. (Each small torch call hands the GIL over, and
    under load the thread that applies the log then waits a switch interval for it back.)"""
    buffers = layer._buffers
    running_mean = buffers["running_mean"].numpy()
    running_var = buffers["running_var"].numpy()
    mean, var = delta.mean.numpy(), delta.var.numpy()
    unbiased = var * var.dtype.type(delta.count / (delta.count - 1))
    new = copy.copy(layer)
    new._buffers = dict(buffers)
    new._parameters = dict(layer._parameters)
    if isinstance(layer, _BATCH_NORMS):
        tracked = int(buffers["num_batches_tracked"])
        momentum = layer.momentum if layer.momentum is not None else 1.0 / float(tracked + 1)
        new._buffers["num_batches_tracked"] = torch.tensor(tracked + 1)
    else:
        momentum = layer.momentum if layer.momentum is not None else 0.0
    for key, running, stat in (("running_mean", running_mean, mean),
                               ("running_var", running_var, unbiased)):
        kind = running.dtype.type
        folded = running * kind(1 - momentum) + kind(momentum) * stat.astype(running.dtype)
        new._buffers[key] = torch.from_numpy(folded)
    return new


def answer_again(slot, x: torch.Tensor, count: int | None) -> Outcome:
    """The answer to a retry of a step already applied: the step is taken again on a private
    copy of ``slot``'s layer, which is dropped (the output depends only on ``x`` and the
    layer's weight and bias), with the count the first step produced."""
    layer = computing_copy(slot.layer, x) or fork(slot.layer)
    with torch.inference_mode():
        result = layer.normalize(x.to(slot.device), train=True)
    return Outcome.of(result, count)


def settled(outcome: Outcome) -> Future:
    """A future that already holds ``outcome``."""
    done: Future = Future()
    done.set_result(outcome)
    return done


def after(future: Future | None, finish: Callable[[], Outcome]) -> Future:
    """A future of ``finish()``, called once ``future`` has settled (at once if it is None
    or settled), in the thread that settles it; ``finish`` reads ``future.result()``."""
    out: Future = Future()

    def run(_: Future | None = None) -> None:
        # ``finish`` runs even if ``out`` was cancelled: it completes the step's bookkeeping.
        try:
            value, error = finish(), None
        except BaseException as exc:  # the owner of ``out`` gets it, whatever it is
            value, error = None, exc
        with contextlib.suppress(InvalidStateError):  # cancelled: nobody is waiting
            if error is None:
                out.set_result(value)
            else:
                out.set_exception(error)

    if future is None:
        run()
    else:
        future.add_done_callback(run)
    return out
