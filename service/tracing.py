"""OpenTelemetry traces, set up by the standard ``OTEL_*`` variables, the way Triton's
``--trace-config mode=opentelemetry`` and MLServer's tracing are used:

    OTEL_TRACES_EXPORTER            otlp | console | none (unset: no tracing), comma-separated
    OTEL_EXPORTER_OTLP_ENDPOINT     where otlp sends spans (the exporter's own default else)
    OTEL_EXPORTER_OTLP_PROTOCOL     http/protobuf (default) or grpc; _TRACES_PROTOCOL wins
    OTEL_SERVICE_NAME               the service.name of every span ("normcore" by default)
    OTEL_SDK_DISABLED=true          no tracing, whatever else is set

and the rest of the OpenTelemetry SDK's variables (OTEL_RESOURCE_ATTRIBUTES, OTEL_BSP_*,
OTEL_EXPORTER_OTLP_HEADERS, OTEL_PROPAGATORS, ...), which the SDK reads itself.

Each request served over HTTP or gRPC is a server span (``server_span``), a child of the
caller's ``traceparent``; the compute is a span inside it (``span``). When tracing is off,
as by default, this module imports nothing of OpenTelemetry (neither the SDK nor an
exporter), ``span`` returns one shared no-op context manager and the transports add no span
code at all (``enabled``).

The tracer provider is this module's own, not OpenTelemetry's global one: several apps in
a process (tests) can each be traced, and nothing else in the process is changed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

_tracer: Any = None  # an opentelemetry Tracer while tracing is on
_provider: Any = None
_NOTHING = contextlib.nullcontext()


class TracingConfigError(ValueError):
    """The OTEL_* variables ask for something this service cannot do."""


def enabled() -> bool:
    return _tracer is not None


def wanted(environ: Mapping[str, str] = os.environ) -> list[str]:
    """The exporters the environment asks for (none: tracing stays off)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = [n.strip().lower() for n in environ.get("OTEL_TRACES_EXPORTER", "").split(",")]
    return [n for n in names if n and n != "none"]


def _exporter(name: str, environ: Mapping[str, str]) -> Any:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if name != "otlp":
        raise TracingConfigError(f"OTEL_TRACES_EXPORTER={name} is not supported; use otlp, "
                                 "console or none")
    protocol = (environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf").strip()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    elif protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    else:
        raise TracingConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol} is not supported; "
                                 "use http/protobuf or grpc")
    return OTLPSpanExporter()


def configure(environ: Mapping[str, str] = os.environ, exporters: list[Any] | None = None
              ) -> bool:
    """Turn tracing on if ``environ`` asks for it (or ``exporters`` are given); whether it
    is on. ``TracingConfigError`` for an exporter or protocol that cannot be had."""
    global _tracer, _provider
    names = wanted(environ)
    if not names and not exporters:
        return False
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    from . import __version__

    # The SDK reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; attributes given here
    # win over them, so the default name is given only when neither names the service.
    named = environ.get("OTEL_SERVICE_NAME") or "service.name=" in environ.get(
        "OTEL_RESOURCE_ATTRIBUTES", "")
    attributes = {"service.version": __version__}
    if not named:
        attributes[SERVICE_NAME] = "normcore"
    provider = TracerProvider(resource=Resource.create(attributes))
    for name in names:
        exporter = _exporter(name, environ)
        # The console shows each span as it ends; others send batches.
        processor = SimpleSpanProcessor if name == "console" else BatchSpanProcessor
        provider.add_span_processor(processor(exporter))
    for exporter in exporters or []:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    _provider, _tracer = provider, provider.get_tracer("normcore", __version__)
    return True


def shutdown() -> None:
    """Send the spans still buffered and turn tracing off."""
    global _tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    _tracer = _provider = None


def span(name: str, **attributes: Any):
    """A span inside the current one (a context manager); a shared no-op when off."""
    if _tracer is None:
        return _NOTHING
    return _tracer.start_as_current_span(name, attributes=attributes)


@contextlib.contextmanager
def server_span(name: str, carrier: Mapping[str, str], **attributes: Any) -> Iterator[Any]:
    """A server span for a request whose headers or metadata are ``carrier`` (lowercase
    keys; a W3C ``traceparent`` there makes it a child of the caller's span). Only called
    when tracing is on."""
    from opentelemetry import propagate
    from opentelemetry.trace import SpanKind

    parent = propagate.extract(carrier)
    with _tracer.start_as_current_span(name, context=parent, kind=SpanKind.SERVER,
                                       attributes=attributes) as current:
        yield current


def mark_error(current: Any, description: str) -> None:
    """Set a span's status to error."""
    from opentelemetry.trace import Status, StatusCode

    current.set_status(Status(StatusCode.ERROR, description))
