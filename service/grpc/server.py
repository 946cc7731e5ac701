"""The gRPC server: ``inference.GRPCInferenceService`` over the app's engine.

A grpc thread-pool server in the app's process, started and stopped by the app's lifespan
(``service.app``). Every RPC runs in one of its threads and makes its engine calls there,
as the HTTP routes do in their thread pool; eval requests are not merged by dynamic
batching, which lives on the HTTP event loop.

What HTTP does, gRPC does the same way: the token (metadata ``authorization: Bearer ...``,
``service.core.auth``), the limits (``max_body_bytes`` caps a message, ``max_rank`` and
``max_elements`` a tensor), the request timeout, durability and idempotent retries (the
engine's), ``x-request-id`` (honoured or generated, echoed in the initial metadata), one
access log line and the Prometheus counters per call, and a server span when tracing is on
(``service.tracing``). Errors are the gRPC codes and V2
messages of ``service.http.errors``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc

from .. import __version__, logs, tracing
from ..context import REQUEST_ID, request_id_from
from ..core.auth import Access
from ..core.engine import Engine, LayerInfo
from ..http.errors import grpc_status_of
from ..settings import Settings
from ..wire import v2_grpc, v2_repository, v2_types
from ..wire.proto import METHODS, SERVICE, messages
from ..wire.tensors import Limits

log = logging.getLogger("normcore.service")

# (route, layer, mode, status, seconds, ok, rejected), as Metrics.observe takes them.
Observer = Callable[[str, str, str, str, float, bool, bool], None]
_CLIENT_ERRORS = {"INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS", "RESOURCE_EXHAUSTED",
                  "UNAUTHENTICATED", "PERMISSION_DENIED"}


@dataclass
class Call:
    """One RPC being served: its metadata, and what its log line and metrics say."""

    metadata: dict[str, str]
    layer: str = ""
    mode: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def authorization(self) -> str | None:
        return self.metadata.get("authorization")


class InferenceService:
    """The RPCs, each ``(request message, Call) -> response message``."""

    def __init__(self, engine: Engine, settings: Settings, limits: Limits,
                 is_ready: Callable[[], bool]) -> None:
        self.engine = engine
        self.settings = settings
        self.limits = limits
        self.is_ready = is_ready
        token = settings.api_token
        self.access = Access(None if token is None else token.get_secret_value(),
                             settings.protect_reads)

    # --- health and metadata ------------------------------------------------------------

    def ServerLive(self, request: Any, call: Call) -> Any:
        return messages.ServerLiveResponse(live=True)

    def ServerReady(self, request: Any, call: Call) -> Any:
        return messages.ServerReadyResponse(ready=self.is_ready())

    def ServerMetadata(self, request: Any, call: Call) -> Any:
        return v2_grpc.to_message(v2_types.server_metadata(__version__),
                                  messages.ServerMetadataResponse)

    def ModelReady(self, request: Any, call: Call) -> Any:
        self.access.read(call.authorization)
        call.layer = request.name
        try:
            _, version = self.engine.served(request.name)
            if request.version:
                v2_types.check_version(request.name, request.version, version)
        except LookupError:  # unknown, unloaded, another version: not ready, as over HTTP
            return messages.ModelReadyResponse(ready=False)
        return messages.ModelReadyResponse(ready=True)

    def _info(self, name: str, version: str, call: Call) -> LayerInfo:
        self.access.read(call.authorization)
        call.layer = name
        info = self.engine.layer_info(name)
        if version:
            v2_types.check_version(name, version, info.version)
        return info

    def ModelMetadata(self, request: Any, call: Call) -> Any:
        info = self._info(request.name, request.version, call)
        return v2_grpc.to_message(
            v2_types.model_metadata(request.name, info.kind, info.config, info.version),
            messages.ModelMetadataResponse)

    # --- extensions: configuration, statistics, repository -------------------------------

    def ModelConfig(self, request: Any, call: Call) -> Any:
        info = self._info(request.name, request.version, call)
        return v2_grpc.to_message({"config": v2_repository.model_config(info)},
                                  messages.ModelConfigResponse)

    def ModelStatistics(self, request: Any, call: Call) -> Any:
        if request.name:
            layers = [self._info(request.name, request.version, call)]
        else:
            self.access.read(call.authorization)
            layers = self.engine.server_info().layers
        return v2_grpc.to_message(v2_repository.model_statistics(layers),
                                  messages.ModelStatisticsResponse)

    def RepositoryIndex(self, request: Any, call: Call) -> Any:
        self.access.read(call.authorization)
        index = v2_repository.repository_index(self.engine.server_info().layers, request.ready)
        return v2_grpc.to_message({"models": index}, messages.RepositoryIndexResponse)

    def RepositoryModelLoad(self, request: Any, call: Call) -> Any:
        self.access.write(call.authorization)
        call.layer = request.model_name
        v2_repository.decode_load_request({"parameters": dict(request.parameters)})
        self.engine.load_layer(request.model_name)
        return messages.RepositoryModelLoadResponse()

    def RepositoryModelUnload(self, request: Any, call: Call) -> Any:
        self.access.write(call.authorization)
        call.layer = request.model_name
        self.engine.unload_layer(request.model_name)
        return messages.RepositoryModelUnloadResponse()

    # --- infer --------------------------------------------------------------------------

    def ModelInfer(self, request: Any, call: Call) -> Any:
        name = request.model_name
        # Before the lookup (with reads protected, NOT_FOUND names layers) and the tensor.
        self.access.early(call.authorization)
        kind, version = self.engine.served(name)
        call.layer = name
        if request.model_version:
            v2_types.check_version(name, request.model_version, version)
        parsed = v2_grpc.decode_infer_request(request, v2_types.output_names(kind), self.limits)
        call.mode = parsed.mode
        self.access.for_mode(parsed.mode, call.authorization)
        deadline = time.monotonic() + self.settings.request_timeout
        outcome = self.engine.normalize(name, parsed.x, parsed.mode, parsed.request_id,
                                        deadline)
        return v2_grpc.encode_infer_response(name, str(version), parsed,
                                             outcome.output, outcome.stats,
                                             outcome.num_batches_tracked)


def _metadata(context: grpc.ServicerContext) -> dict[str, str]:
    return {key: value for key, value in context.invocation_metadata()
            if isinstance(value, str)}


def _handler(service: InferenceService, method: str, observe: Observer | None):
    request_class, response_class = METHODS[method]
    serve = getattr(service, method)
    route = f"/{SERVICE}/{method}"

    def handle(request: Any, context: grpc.ServicerContext) -> Any:
        start = time.perf_counter()
        call = Call(_metadata(context))
        request_id = request_id_from(call.metadata.get("x-request-id"))
        token = REQUEST_ID.set(request_id)
        status = "OK"
        try:
            context.send_initial_metadata((("x-request-id", request_id),))
            if not tracing.enabled():
                return serve(request, call)
            with tracing.server_span(f"{SERVICE}/{method}", call.metadata, **{
                "rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": method,
                "normcore.request_id": request_id,
            }) as span:
                try:
                    return serve(request, call)
                finally:
                    for key, value in (("layer", call.layer), ("mode", call.mode)):
                        if value:
                            span.set_attribute(f"normcore.{key}", value)
        except Exception as exc:
            status, message = grpc_status_of(exc)
            context.abort(grpc.StatusCode[status], message)
        finally:
            elapsed = time.perf_counter() - start
            if observe is not None:
                observe(route, call.layer, call.mode, status, elapsed, status == "OK",
                        status in _CLIENT_ERRORS)
            logs.access("RPC", route, route, status, elapsed, call.layer, call.mode)
            REQUEST_ID.reset(token)

    return grpc.unary_unary_rpc_method_handler(
        handle, request_deserializer=request_class.FromString,
        response_serializer=response_class.SerializeToString)


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class GrpcServer:
    """``InferenceService`` on ``settings.grpc_port`` of ``settings.host``."""

    def __init__(self, engine: Engine, settings: Settings, limits: Limits,
                 is_ready: Callable[[], bool], observe: Observer | None = None) -> None:
        self.settings = settings
        service = InferenceService(engine, settings, limits, is_ready)
        handlers = {name: _handler(service, name, observe) for name in METHODS
                    if hasattr(service, name)}
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=min(32, (os.cpu_count() or 1) + 4),
                                       thread_name_prefix="normcore-grpc"),
            handlers=[grpc.method_handlers_generic_handler(SERVICE, handlers)],
            options=[
                ("grpc.max_receive_message_length", settings.max_body_bytes),
                ("grpc.max_send_message_length", -1),
                # A port another process holds is an error, not a shared port.
                ("grpc.so_reuseport", 0),
            ],
        )

    def start(self) -> int:
        """Listen and serve; the port bound. ``OSError`` if it cannot be bound."""
        address = _address(self.settings.host, self.settings.grpc_port)
        try:
            port = self._server.add_insecure_port(address)
        except RuntimeError as exc:
            raise OSError(f"gRPC cannot listen on {address}: {exc}") from None
        if port == 0:
            raise OSError(f"gRPC cannot listen on {address}")
        self._server.start()
        log.info("gRPC (KServe V2) listening on %s", _address(self.settings.host, port))
        return port

    def stop(self, grace: float = 10.0) -> None:
        """Refuse new calls, let those in flight finish for up to ``grace`` seconds."""
        self._server.stop(grace).wait()
