"""create_app(settings) -> FastAPI: wiring only; nothing happens at import time."""

from __future__ import annotations

import asyncio
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
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Match, Route

from normcore import kernels

from . import __version__, tracing
from .core.batching import EvalBatcher
from .core.catalog import LayerSpec, default_catalog, load_catalog
from .core.devices import resolve_device
from .core.engine import Engine
from .http.body_limit import BodyLimitMiddleware
from .http.deps import run_step
from .http.errors import install_error_handlers
from .http.metrics import Metrics, MetricsMiddleware
from .http.request_id import RequestIdMiddleware
from .http.routes import admin, health, models, normalize, stats, ui, v2, v2_repository
from .http.schemas import with_bearer_scheme, with_request_models
from .http.tracing import TracingMiddleware
from .settings import ENV_FILE, Settings
from .state.changes import ChangeLog
from .state.persistence import Persistence
from .state.records import StateFileError
from .state.shared import SQLITE_FILE, Postgres, SharedLog, SQLite
from .state.store import Store
from .wire.tensors import Limits

log = logging.getLogger("normcore.service")

YOUNG_COLLECTION_THRESHOLD = 10_000  # allocations between collections (see _load)
# What a browser may send cross-origin: the token, bodies (compressed, V2 binary) and ids.
CORS_HEADERS = ["Authorization", "Content-Type", "Content-Encoding", "Accept-Encoding",
                "Inference-Header-Content-Length", "X-Request-ID"]


def _warn_about(settings: Settings) -> None:
    """Start-up warnings for settings that work but leave the service exposed."""
    if settings.weak_token():
        log.warning("NORMCORE_API_TOKEN is shorter than 16 characters; use a long random one")
    if settings.api_token is None and settings.host not in ("127.0.0.1", "::1", "localhost"):
        log.warning("no NORMCORE_API_TOKEN: anyone who can reach %s may train, replace and "
                    "delete layers", settings.host)


def _load(app: FastAPI, specs: list[LayerSpec] | None, background: bool = False) -> None:
    """Build the kernels and every catalog layer, restore the saved state over them, then
    declare the app ready. A failure is logged (and raised, unless in the background)."""
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
        if background:
            return
        raise
    # Everything loaded so far (torch, the layers) lives as long as the process: moving it
    # out of the collector's sight keeps full collections, which requests' JSON lists
    # trigger often, from walking millions of long-lived objects each time.
    gc.collect()
    gc.freeze()
    # The youngest generation is collected after 700 net allocations by default: a few
    # requests in flight (their bodies, futures and replies) pass that, so a collection
    # ran every request or two and walked them all. Ten thousand keeps the collector for
    # real garbage cycles at a few kilobytes of memory.
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, *gc.get_threshold()[1:])
    app.state.ready = True
    log.info("serving %d layers on %s", engine.layer_count(),
             engine.server_info().default_device)


def _start_grpc(app: FastAPI):
    """KServe V2 over gRPC on the same engine; grpc is loaded only here."""
    from .grpc.server import GrpcServer

    state = app.state
    server = GrpcServer(state.engine, state.settings, state.limits, lambda: state.ready,
                        state.metrics.observe)
    server.start()
    return server


def _change_log(settings: Settings) -> ChangeLog | None:
    """The change log the settings name: PostgreSQL shared by replicas (``state_url``); in
    the state dir, SQLite shared by worker processes (``workers`` > 1, or a dir that holds
    one) or the one-process journal; or None (memory only)."""
    shared = {"snapshot_every": settings.snapshot_every,
              "keys_kept": settings.idempotency_window}
    if settings.state_url is not None:
        return SharedLog(Postgres(settings.state_url.get_secret_value()), **shared)
    folder = settings.state_dir
    if folder is None:
        return None
    if settings.workers > 1 or (folder / SQLITE_FILE).exists():
        if (folder / "snapshot.ncs").exists() and not (folder / SQLITE_FILE).exists():
            raise StateFileError(
                f"{folder} holds the state of one server process (a journal): serve it with "
                "one worker, or start the workers with `python -m service --workers N`, "
                "which adopts it into their shared database first")
        return SharedLog(SQLite(folder), poll_s=0.5, **shared)
    return Persistence(folder, snapshot_every=settings.snapshot_every)


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
    """The service for ``settings`` (without them: the environment's and ``.env``'s),
    serving ``specs`` (the catalog file's if None).

    State changes go to ``change_log`` if given, else to the one the settings name (the
    database of ``state_url``, shared with other replicas; the state dir's journal; or
    none: memory only).

    With ``load_in_background`` the server answers /healthz at once and /readyz turns 200
    when the layers are loaded; otherwise start-up waits for them.
    """
    settings = settings or Settings(_env_file=ENV_FILE)  # as an entry point (uvicorn --factory)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Size torch's intra-op pool to the machine so request threads don't oversubscribe it.
        torch.set_num_threads(settings.threads)
        _warn_about(settings)
        if load_in_background:
            threading.Thread(target=_load, args=(app, specs, True), daemon=True,
                             name="normcore-load").start()
        else:
            _load(app, specs)
        grpc_server = _start_grpc(app) if settings.grpc_port else None
        yield
        if grpc_server is not None:  # the calls in flight are answered
            await run_in_threadpool(grpc_server.stop, 10.0)
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
    app.state.json_gate = asyncio.Semaphore(1)  # see http.deps.one_big_json_at_a_time
    app.state.metrics = metrics
    app.state.ready = False
    app.state.failure = None
    app.state.exit_on_failure = False
    # The one place where the store meets its change log: changes are refused until the
    # log has restored the state dir (at start-up, in _load).
    if change_log is None:
        change_log = _change_log(settings)
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
    app.openapi = lambda: app.openapi_schema or with_bearer_scheme(
        with_request_models(FastAPI.openapi(app)))
    for router in (health.router, normalize.router, stats.router, models.router,
                   admin.router, ui.router):
        app.include_router(router)
    # First: /v2/models/stats must not be taken for the model "stats".
    app.include_router(v2_repository.router)
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
    if settings.cors_origins:
        # Browsers on these origins may call the API; the token travels in a header, never
        # in cookies, so no credentials mode.
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "PUT", "DELETE"], allow_headers=CORS_HEADERS,
            expose_headers=["X-Request-ID", "Inference-Header-Content-Length"], max_age=600)
    if tracing.enabled():  # off (the default): not even a pass-through layer
        app.add_middleware(TracingMiddleware)
    # Outermost: every reply carries the request's id, and everything inside can log it.
    app.add_middleware(RequestIdMiddleware)
    return app
