"""Per-layer drift bookkeeping: each eval batch's score (``service.core.drift``) against the
layer's reference, and what ``/stats`` shows of it.

The reference is the layer's running statistics where it keeps them; other layers keep an
exponential average of the statistics of the inputs they serve (``reference == "inputs"``):
per feature for LayerNorm and RMSNorm, per group for GroupNorm, per channel for BatchNorm
and InstanceNorm without running statistics.

Eval requests run concurrently and without the layer's lock; a monitor has a small lock of
its own, held while it scores against (and folds into) its input reference, or checks a
threshold: tiny work on C values, under the GIL anyway. Scores are queued as they come
(one append) and folded into the counters /stats and /metrics show a few dozen at a time,
or when those are read: an eval request's path stays short. Nothing here is durable: a
restart starts every layer's drift afresh.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from bisect import bisect_left
from collections import deque

import torch
from torch import nn

from normcore.functional import Normalized, RMSNormalized

from ..core.drift import (
    BUCKETS,
    DEFAULT_EPS,
    NO_DRIFT,
    Drift,
    DriftInfo,
    Moments,
    Reference,
    drift,
    feature_drift,
    feature_moments,
    feature_rows,
    fold_weight,
    start,
)

log = logging.getLogger("normcore.drift")

HISTORY = 120  # scores kept for /stats, with their times
EMA_WEIGHT = 0.1  # of each new score in the average /stats shows
FOLD_EVERY = 32  # queued scores folded into the counters at a time
# LayerNorm/RMSNorm inputs up to this many values are scored in one fused pass under the
# monitor's lock; larger ones have their statistics computed first, outside it.
FUSED_ELEMENTS = 1 << 16


class DriftMonitor:
    """The drift of the served layer ``name`` of ``kind``. A score over ``threshold`` after
    one at or under it is a crossing: counted and logged."""

    def __init__(self, name: str, kind: str, threshold: float | None = None) -> None:
        self.name = name
        self.kind = kind
        self.threshold = threshold
        self._features = kind in ("LayerNorm", "RMSNorm")  # else the layer's own statistics
        self._width: int | None = None  # features per row, for those
        self._lock = threading.Lock()
        self._inputs: Reference | None = None  # for layers without running statistics
        self._batches = 0  # in it
        self._running: tuple[nn.Module, Reference] | None = None  # the served layer's
        self._latest = NO_DRIFT
        self._ema: float | None = None
        self._max: float | None = None
        self._scored = 0
        self._crossings = 0
        self._over = False
        self._history: deque[tuple[float, float]] = deque(maxlen=HISTORY)
        self._queued: deque[tuple[float, float]] = deque()  # (time, score), not yet folded
        self._buckets = [0] * (len(BUCKETS) + 1)  # the histogram /metrics shows
        self._total = 0.0

    # --- scoring ------------------------------------------------------------------------

    def observe(self, layer: nn.Module, x: torch.Tensor,
                result: Normalized | RMSNormalized) -> Drift:
        """Score one eval batch ``x`` that ``layer`` (the served one) normalized into
        ``result``."""
        eps = layer.eps or DEFAULT_EPS
        if layer._buffers.get("running_mean") is not None:  # every eval: no __getattr__
            # BatchNorm's batch statistics, [C]; InstanceNorm's per instance, [N, C].
            batch = Moments(result.mean, result.var, x.numel() // max(result.mean.numel(), 1))
            scored = drift(batch, self._running_reference(layer), eps)
        elif self._features:
            scored = self._features_against_inputs(layer, x, eps)
        else:  # per-channel, per-instance or per-group statistics, as the layer computed
            count = x.numel() // max(result.mean.numel(), 1)
            scored = self._against_inputs(Moments(result.mean, result.var, count), eps)
        return scored if scored.score is None else self._record(scored)

    def _running_reference(self, layer: nn.Module) -> Reference:
        """The running statistics of ``layer``: a served layer is never edited (train steps
        swap in a new one), so they are checked once per layer object."""
        cached = self._running
        if cached is None or cached[0] is not layer:
            buffers = layer._buffers
            cached = self._running = (layer, Reference(buffers["running_mean"],
                                                       buffers["running_var"]))
        return cached[1]

    def _features_against_inputs(self, layer: nn.Module, x: torch.Tensor,
                                 eps: float) -> Drift:
        features = self._width
        if features is None:
            features = self._width = math.prod(layer.normalized_shape)
        rows = feature_rows(x, features)
        if self._inputs is not None and rows.numel() <= FUSED_ELEMENTS:
            with self._lock:
                scored = feature_drift(rows, self._inputs, eps, fold_weight(self._batches + 1))
                if scored is not None:
                    self._batches += scored.score is not None
                    return scored
        return self._against_inputs(feature_moments(rows), eps)

    def _against_inputs(self, batch: Moments, eps: float) -> Drift:
        with self._lock:
            reference = self._inputs
            if reference is None:  # the first batch starts the reference
                self._inputs = start(batch)
                self._batches = 0 if self._inputs is None else 1
                return NO_DRIFT
            if batch.mean.shape[-1:] != reference.mean.shape:
                return NO_DRIFT
            scored = drift(batch, reference, eps, fold_weight(self._batches + 1))
            self._batches += scored.score is not None
            return scored

    def _record(self, scored: Drift) -> Drift:
        value = scored.score
        self._latest = scored
        queued = self._queued
        queued.append((time.time(), value))  # deque: thread-safe without the lock
        if len(queued) >= FOLD_EVERY:
            self._fold()
        threshold = self.threshold
        if threshold is None:
            return scored
        with self._lock:  # crossings need the scores' order
            over = value > threshold
            crossed = over and not self._over
            self._over = over
            self._crossings += crossed
        if crossed:
            log.warning("drift on %s: score %.4g crossed its drift_threshold %g (channels that "
                        "moved most: %s)", self.name, value, threshold,
                        ", ".join(f"{c} ({j:.3g})" for c, j in scored.channels))
        return scored

    def _fold(self) -> None:
        """Fold the queued scores into the counters, in the order they came."""
        with self._lock:
            queued = self._queued
            ema, top, total = self._ema, self._max, self._total
            while queued:
                entry = queued.popleft()
                value = entry[1]
                ema = value if ema is None else ema + EMA_WEIGHT * (value - ema)
                top = value if top is None or value > top else top
                total += value
                self._buckets[bisect_left(BUCKETS, value)] += 1
                self._history.append(entry)
                self._scored += 1
            self._ema, self._max, self._total = ema, top, total

    # --- reading ------------------------------------------------------------------------

    def info(self, layer: nn.Module) -> DriftInfo:
        """What ``/stats`` shows of this layer's drift."""
        running = layer._buffers.get("running_mean") is not None
        self._fold()
        with self._lock:
            inputs = None if running else self._inputs
            return DriftInfo(
                "running" if running else "inputs",
                self._latest.score, self._ema, self._max, self._scored, self.threshold,
                self._crossings, tuple(self._history), self._latest.channels,
                tuple(self._buckets), self._total,
                None if inputs is None else inputs.mean.clone(),
                None if inputs is None else inputs.var.clone(),
                0 if inputs is None else self._batches,
            )
