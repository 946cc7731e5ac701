"""``python -m service``: settings -> catalog -> create_app -> uvicorn."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from pydantic import ValidationError


def parse_args(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m service",
        description="Serve normcore layers over HTTP. Every flag also reads NORMCORE_<NAME>; "
        "flags win.",
    )
    parser.add_argument("--host", help="interface to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default 8000)")
    parser.add_argument("--catalog", help="layer catalog TOML (default: the built-in one)")
    parser.add_argument("--state-dir", help="folder for durable state (default: memory only)")
    parser.add_argument("--state-url", help="postgresql://user:password@host:port/db: state "
                        "shared by every replica using the same database")
    parser.add_argument("--workers", type=int, help="server processes on one port, sharing "
                        "one state (default 1)")
    parser.add_argument("--device", help="auto | cpu | cuda | cuda:N (default auto)")
    parser.add_argument("--log-level", help="critical|error|warning|info|debug|trace")
    args = vars(parser.parse_args(argv))
    return {k: v for k, v in args.items() if v is not None}


def main(argv: list[str] | None = None) -> int:
    # torch's OpenMP workers otherwise spin for milliseconds after every parallel op, taking
    # the cores the event loop needs to move request and response bodies: on a small or
    # shared machine that multiplies latency. Read once, when torch loads; the
    # environment's own value wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from .settings import Settings
    from .workers import Workers, child_socket

    flags = parse_args(argv)
    try:
        settings = Settings(**flags)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        print(f"normcore: invalid settings: {problems}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper() if settings.log_level != "trace"
                        else "DEBUG", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sock = child_socket()
    if settings.workers > 1 and sock is None:
        try:
            return Workers(settings, flags).run()
        except OSError as exc:
            print(f"normcore: cannot listen on {settings.host}:{settings.port}: {exc}",
                  file=sys.stderr)
            return 2
    import uvicorn

    from .app import create_app
    from .core.catalog import CatalogError, load_catalog
    from .http.protocol import guarded_http_protocol
    from .state.records import StateFileError
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
    config = uvicorn.Config(app, host=settings.host, port=settings.port,
                            log_level=settings.log_level, timeout_graceful_shutdown=20,
                            ws="none", http=guarded_http_protocol(settings.client_timeout))
    # One of several workers accepts from the socket its parent bound (service/workers.py).
    uvicorn.Server(config).run(sockets=None if sock is None else [sock])
    return 1 if app.state.failure else 0


if __name__ == "__main__":
    sys.exit(main())
