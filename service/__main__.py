"""``python -m service``: settings (flags, environment, .env) -> catalog -> create_app ->
uvicorn. ``python -m service --help`` lists every setting."""

from __future__ import annotations

import os
import signal
import sys

from pydantic import ValidationError


def main(argv: list[str] | None = None) -> int:
    # torch's OpenMP workers otherwise spin for milliseconds after every parallel op, taking
    # the cores the event loop needs to move request and response bodies: on a small or
    # shared machine that multiplies latency. Read once, when torch loads; the
    # environment's own value wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from . import logs, tracing
    from .settings import load_settings
    from .workers import Workers, child_socket

    # First: --help and bad flags answer before the server is set up.
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        settings = load_settings(argv)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        print(f"normcore: invalid settings: {problems}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_format)
    sock = child_socket()
    if settings.workers > 1 and sock is None:
        try:
            _adopt_one_process_state(settings)
        except Exception as exc:  # the catalog or the state dir cannot be read
            print(f"normcore: cannot start: {exc}", file=sys.stderr)
            return 2
        try:
            return Workers(settings, argv).run()
        except OSError as exc:
            print(f"normcore: cannot listen on {settings.host}:{settings.port}: {exc}",
                  file=sys.stderr)
            return 2
    import uvicorn

    from .app import create_app
    from .core.catalog import CatalogError, load_catalog
    from .http.protocol import guarded_http_protocol
    from .state.records import StateFileError
    try:
        tracing.configure()  # by the OTEL_* variables; nothing is loaded without them
    except tracing.TracingConfigError as exc:
        print(f"normcore: cannot start: {exc}", file=sys.stderr)
        return 2
    if settings.tune_allocator:
        from normcore.kernels import tune_allocator

        tune_allocator()  # before the first large tensor: a process-wide malloc setting
    try:
        specs = load_catalog(settings.catalog)  # fail fast, with one clear message
        # One of several workers loads before it accepts from the shared socket, so a
        # worker still loading never takes a request; alone, /readyz answers meanwhile.
        app = create_app(settings, specs=specs, load_in_background=sock is None)
    except (CatalogError, StateFileError, ValueError) as exc:
        print(f"normcore: cannot start: {exc}", file=sys.stderr)
        return 2
    app.state.exit_on_failure = True
    # uvicorn re-raises the SIGTERM it handled once it has shut down. By then the requests
    # in flight are answered and the state saved, so the stop was graceful: exit 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    # The guarded protocol closes connections whose request does not arrive within
    # client_timeout (slow clients); the service has no WebSocket routes, so none are served.
    # Logging is configured above (log_config=None: uvicorn leaves it as it is); the access
    # lines come from the app (service.logs.access), with the request id, layer and latency.
    config = uvicorn.Config(app, host=settings.host, port=settings.port,
                            log_level=settings.log_level, log_config=None, access_log=False,
                            timeout_graceful_shutdown=20, ws="none",
                            http=guarded_http_protocol(settings.client_timeout))
    # One of several workers accepts from the socket its parent bound (service/workers.py).
    uvicorn.Server(config).run(sockets=None if sock is None else [sock])
    tracing.shutdown()  # the spans still buffered are sent
    return 1 if app.state.failure else 0


def _adopt_one_process_state(settings) -> None:
    """``--workers N`` on a state dir that one process served: its snapshot and journal
    become the workers' shared database first (``service/state/adopt.py``)."""
    folder = settings.state_dir
    if settings.state_url is not None or folder is None:
        return
    from .state.adopt import adopt_journal, needs_adoption

    if needs_adoption(folder):
        from .core.catalog import load_catalog  # torch, only to adopt

        adopt_journal(folder, load_catalog(settings.catalog), settings.idempotency_window)


if __name__ == "__main__":
    sys.exit(main())
