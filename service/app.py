"""create_app(settings) -> FastAPI: wiring only; nothing happens at import time."""

from __future__ import annotations

import gc
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.routing import Match, Route

from normcore import kernels

from . import __version__
from .core.batching import EvalBatcher
from .core.catalog import LayerSpec, default_catalog, load_catalog
from .core.devices import resolve_device
from .core.engine import Engine
from .http.body_limit import BodyLimitMiddleware
from .http.deps import run_step
from .http.errors import install_error_handlers
from .http.metrics import Metrics, MetricsMiddleware
from .http.routes import admin, health, normalize, stats, ui, v2
from .http.schemas import with_request_models
from .settings import Settings
from .state.changes import ChangeLog
from .state.persistence import Persistence
from .state.store import Store
from .wire.tensors import Limits

log = logging.getLogger("normcore.service")


def _warn_about(settings: Settings) -> None:
    """Start-up warnings for settings that work but leave the service exposed."""
    if settings.weak_token():
        log.warning("NORMCORE_API_TOKEN is shorter than 16 characters; use a long random one")
    if settings.api_token is None and settings.host not in ("127.0.0.1", "::1", "localhost"):
        log.warning("no NORMCORE_API_TOKEN: anyone who can reach %s may train, replace and "
                    "delete layers", settings.host)


def _load(app: FastAPI, specs: list[LayerSpec] | None) -> None:
    """Build the kernels and every catalog layer, restore the state dir over them, then
    declare the app ready."""
    settings = app.state.settings
    kernels.set_enabled(settings.kernels)
    # Compiles on a machine's first start (seconds), loads the cached build after; a failed
    # build is logged and leaves the plain torch path, it does not stop the service.
    log.info("fused kernels: %s", "on" if kernels.warm_up() else "off")
    engine = app.state.engine
    try:
        engine.load(specs if specs is not None else load_catalog(settings.catalog))
    except Exception as exc:
        app.state.failure = str(exc)
        log.error("normcore cannot start: %s", exc)
        if app.state.exit_on_failure:
            os.kill(os.getpid(), signal.SIGTERM)  # uvicorn shuts down; __main__ exits 1
        raise
    # Everything loaded so far (torch, the layers) lives as long as the process: moving it
    # out of the collector's sight keeps full collections, which requests' JSON lists
    # trigger often, from walking millions of long-lived objects each time.
    gc.collect()
    gc.freeze()
    app.state.ready = True
    log.info("serving %d layers on %s", engine.layer_count(),
             engine.server_info().default_device)


class _DirectRoute(Route):
    """A plain route that still names itself in the scope, as FastAPI's routes do, so
    metrics are labelled by its path template."""

    def matches(self, scope):
        match, child_scope = super().matches(scope)
        if match is Match.FULL:
            child_scope["route"] = self
        return match, child_scope


def create_app(
    settings: Settings | None = None, *, specs: list[LayerSpec] | None = None,
    load_in_background: bool = False, change_log: ChangeLog | None = None,
) -> FastAPI:
    """The service for ``settings``, serving ``specs`` (the catalog file's if None).

    State changes go to ``change_log`` if given, else to the one the settings name (the
    state dir's journal, or none: memory only).

    With ``load_in_background`` the server answers /healthz at once and /readyz turns 200
    when the layers are loaded; otherwise start-up waits for them.
    """
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Size torch's intra-op pool to the machine so request threads don't oversubscribe it.
        torch.set_num_threads(settings.threads)
        _warn_about(settings)
        if load_in_background:
            threading.Thread(target=_load, args=(app, specs), daemon=True,
                             name="normcore-load").start()
        else:
            _load(app, specs)
        yield
        # uvicorn has finished the requests in flight: sync the journal, write a snapshot.
        await run_in_threadpool(app.state.engine.close)

    app = FastAPI(
        title="normcore",
        version=__version__,
        summary="Normalization layers with PyTorch's exact semantics, served.",
        lifespan=lifespan,
    )
    metrics = Metrics()
    app.state.settings = settings
    app.state.limits = Limits(settings.max_rank, settings.max_elements, settings.max_json_bytes)
    app.state.metrics = metrics
    app.state.ready = False
    app.state.failure = None
    app.state.exit_on_failure = False
    # The one place where the store meets its change log: changes are refused until the
    # log has restored the state dir (at start-up, in _load).
    if change_log is None and settings.state_dir is not None:
        change_log = Persistence(settings.state_dir, snapshot_every=settings.snapshot_every)
    store = Store(resolve_device(settings.device), log=change_log,
                  reject_non_finite=not settings.allow_non_finite,
                  idempotency_window=settings.idempotency_window)
    app.state.engine = Engine(
        store, max_layers=settings.max_layers, max_layer_features=settings.max_layer_features,
        catalog_folder=(settings.catalog or default_catalog()).parent)
    metrics.watch(app.state.engine)
    app.state.batcher = None
    if settings.batch_max_size > 1:
        app.state.batcher = EvalBatcher(
            app.state.engine,
            lambda elements, fn, *args: run_step(elements, False, fn, *args),
            settings.batch_max_size, settings.batch_max_delay_ms / 1000,
        )
    install_error_handlers(app)
    app.openapi = lambda: app.openapi_schema or with_request_models(FastAPI.openapi(app))
    for router in (health.router, normalize.router, stats.router, admin.router, ui.router):
        app.include_router(router)
    app.include_router(v2.router)
    # The two hot routes are also matched first as plain routes: the same endpoints, minus
    # the per-request dependency solving and routing scan (the FastAPI routes above still
    # document them in the OpenAPI schema).
    app.router.routes[:0] = [
        _DirectRoute("/normalize", normalize.normalize, methods=["POST"]),
        _DirectRoute("/v2/models/{name}/infer", v2.infer_directly, methods=["POST"]),
    ]
    # Added first, so it runs inside the metrics middleware and its 413s are counted.
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
