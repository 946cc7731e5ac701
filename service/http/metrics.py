"""Prometheus metrics: requests and latency by route, layer and mode; train updates;
rejected requests; the drift score of eval batches by layer. Each app has its own registry,
so several apps can live in a process.

Drift is read from the engine when metrics are scraped (``DriftCollector``): each layer
keeps its score histogram with its other drift counters, so an eval request pays nothing
here for it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from itertools import accumulate

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import logs
from ..core.drift import BUCKETS
from ..core.engine import Engine

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "normcore_requests", "HTTP requests served.", ["route", "layer", "mode", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "normcore_request_duration_seconds", "Time to answer a request.",
            ["route", "layer", "mode"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.train_updates = Counter(
            "normcore_train_updates", "Train steps applied to running statistics.", ["layer"],
            registry=self.registry,
        )
        self.rejected = Counter(
            "normcore_rejected_requests", "Requests answered with a 4xx status.",
            ["route", "status"], registry=self.registry,
        )

    def watch(self, engine: Engine) -> None:
        """Export the drift of ``engine``'s layers."""
        self.registry.register(DriftCollector(engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def observe(self, route: str, layer: str, mode: str, status: str, seconds: float,
                ok: bool, rejected: bool) -> None:
        """One request served (over HTTP or gRPC): ``ok`` if it succeeded, ``rejected`` if
        the client was refused (a 4xx, or its gRPC equivalent)."""
        self.latency.labels(route, layer, mode).observe(seconds)
        self.requests.labels(route, layer, mode, status).inc()
        if rejected:
            self.rejected.labels(route, status).inc()
        if ok and mode == "train" and layer:
            self.train_updates.labels(layer).inc()


class DriftCollector:
    """Per layer: the latest drift score (a gauge), the histogram of every score, and the
    crossings of its drift_threshold, as the engine knows them at scrape time."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def describe(self) -> list[Metric]:
        return []  # nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        latest = GaugeMetricFamily(
            "normcore_drift_score", "Drift score of the layer's latest scored eval batch.",
            labels=["layer"])
        scores = HistogramMetricFamily(
            "normcore_batch_drift", "Drift scores of eval batches (symmetric KL divergence "
            "from the reference, mean over channels).", labels=["layer"])
        crossings = CounterMetricFamily(
            "normcore_drift_crossings", "Eval batches whose score went over the layer's "
            "drift_threshold after one that did not.", labels=["layer"])
        bounds = [*map(str, BUCKETS), "+Inf"]
        for layer in self.engine.server_info().layers:
            drift = layer.drift
            if drift.latest is not None:
                latest.add_metric([layer.name], drift.latest)
            scores.add_metric([layer.name], list(zip(bounds, accumulate(drift.buckets),
                                                     strict=True)), drift.total)
            if drift.threshold is not None:
                crossings.add_metric([layer.name], drift.crossings)
        yield from (latest, scores, crossings)


def label(scope: Scope, key: str, value: str) -> None:
    """Attach a metrics label (layer, mode) to the request being served."""
    scope.setdefault("state", {})[f"metrics_{key}"] = value


class MetricsMiddleware:
    """Times every request, counts it by route template (never by raw path, which a
    client could vary without bound), layer and mode, and writes its access log line."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            state = scope.get("state", {})
            layer = state.get("metrics_layer", "")
            mode = state.get("metrics_mode", "")
            elapsed = time.perf_counter() - start
            self.metrics.observe(route, layer, mode, str(status), elapsed, status == 200,
                                 400 <= status < 500)
            logs.access(scope["method"], scope["path"], route, status, elapsed, layer, mode)
