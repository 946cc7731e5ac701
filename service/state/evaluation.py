"""Eval requests on one slot: normalize with the served layer, change nothing.

Eval reads the served layer without the slot's lock: a train step swaps it, never edits it.
"""

from __future__ import annotations

import time

import torch

from normcore.functional import Normalized, batch_norm_stats

from .slot import Slot
from .steps import Outcome, computing_copy


def evaluate(slot: Slot, x: torch.Tensor) -> Outcome:
    """Normalize ``x`` with ``slot``'s served layer in eval mode, its drift scored."""
    served = slot.layer  # one read: a concurrent train step swaps, never edits, it
    layer = computing_copy(served, x) or served
    x = x.to(slot.device)
    start = time.perf_counter_ns()
    with torch.inference_mode():
        result = layer.normalize(x, train=False)
        drift = slot.drift.observe(served, x, result)
    slot.count("eval", time.perf_counter_ns() - start)
    return Outcome.of(result, drift=drift)


def evaluate_many(slot: Slot, xs: list[torch.Tensor]) -> list[Outcome]:
    """``evaluate`` for several inputs that differ only in dim 0, in one layer call.

    Outputs are exact either way: eval mode normalizes each sample on its own (or with
    the running statistics). Per-sample statistics are split along dim 0; BatchNorm's
    batch statistics belong to each request's own batch, so they are computed per input.
    """
    layer = slot.layer
    start = time.perf_counter_ns()
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
    slot.count("eval", time.perf_counter_ns() - start, len(xs))
    return [Outcome.of(result, drift=drift)
            for result, drift in zip(results, drifts, strict=True)]
