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
from .api import admin, health, normalize, stats, v2
from .api.deps import run_step
from .batching import EvalBatcher
from .catalog import LayerSpec, load_catalog
from .codec import Limits
from .engine import Engine
from .errors import install_error_handlers
from .limits import BodyLimitMiddleware
from .metrics import Metrics, MetricsMiddleware
from .persistence import Persistence
from .schemas import with_request_models
from .settings import Settings
from .store import Store

log = logging.getLogger("normcore.service")


def resolve_device(name: str) -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return device


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
    store = app.state.engine.store
    try:
        specs = specs if specs is not None else load_catalog(settings.catalog)
        if app.state.persistence is not None:
            app.state.persistence.restore(store, specs)
        else:
            for spec in specs:
                store.put(spec, record=False)
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
    log.info("serving %d layers on %s", len(app.state.engine.store),
             app.state.engine.store.default_device)


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
    load_in_background: bool = False,
) -> FastAPI:
    """The service for ``settings``, serving ``specs`` (the catalog file's if None).

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
        if app.state.persistence is not None:
            await run_in_threadpool(app.state.persistence.close)

    app = FastAPI(
        title="normcore",
        version=__version__,
        summary="Normalization layers with PyTorch's exact semantics, served.",
        lifespan=lifespan,
    )
    metrics = Metrics()
    app.state.settings = settings
    app.state.limits = Limits(settings.max_rank, settings.max_elements)
    app.state.metrics = metrics
    app.state.ready = False
    app.state.failure = None
    app.state.exit_on_failure = False
    store = Store(resolve_device(settings.device), reject_non_finite=not settings.allow_non_finite,
                  idempotency_window=settings.idempotency_window)
    app.state.engine = Engine(store)
    app.state.batcher = None
    if settings.batch_max_size > 1:
        app.state.batcher = EvalBatcher(
            app.state.engine,
            lambda elements, fn, *args: run_step(elements, False, fn, *args,
                                                 timeout=settings.request_timeout),
            settings.batch_max_size, settings.batch_max_delay_ms / 1000,
        )
    app.state.persistence = None
    if settings.state_dir is not None:
        app.state.persistence = Persistence(settings.state_dir,
                                            snapshot_every=settings.snapshot_every,
                                            idempotency_window=settings.idempotency_window)
        store.on_update = app.state.persistence  # refuses changes until restored
    install_error_handlers(app)
    app.openapi = lambda: app.openapi_schema or with_request_models(FastAPI.openapi(app))
    for router in (health.router, normalize.router, stats.router, admin.router):
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
