"""create_app(settings) -> FastAPI: wiring only; nothing happens at import time."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI

from normcore import kernels

from . import __version__
from .api import admin, health, normalize, stats
from .catalog import LayerSpec, load_catalog
from .codec import Limits
from .engine import Engine
from .errors import install_error_handlers
from .metrics import Metrics, MetricsMiddleware
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


def _load(app: FastAPI, specs: list[LayerSpec] | None) -> None:
    """Build the kernels and every catalog layer, then declare the app ready."""
    settings = app.state.settings
    kernels.set_enabled(settings.kernels)
    # Compiles on a machine's first start (seconds), loads the cached build after; a failed
    # build is logged and leaves the plain torch path, it does not stop the service.
    log.info("fused kernels: %s", "on" if kernels.warm_up() else "off")
    try:
        for spec in specs if specs is not None else load_catalog(settings.catalog):
            app.state.engine.store.put(spec)
    except Exception as exc:
        app.state.failure = str(exc)
        log.error("normcore cannot start: %s", exc)
        if app.state.exit_on_failure:
            os.kill(os.getpid(), signal.SIGTERM)  # uvicorn shuts down; __main__ exits 1
        raise
    app.state.ready = True
    log.info("serving %d layers on %s", len(app.state.engine.store),
             app.state.engine.store.default_device)


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
        if load_in_background:
            threading.Thread(target=_load, args=(app, specs), daemon=True,
                             name="normcore-load").start()
        else:
            _load(app, specs)
        yield

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
    store = Store(resolve_device(settings.device), reject_non_finite=not settings.allow_non_finite)
    app.state.engine = Engine(store)
    install_error_handlers(app)
    for router in (health.router, normalize.router, stats.router, admin.router):
        app.include_router(router)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
