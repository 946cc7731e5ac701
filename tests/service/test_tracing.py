"""Traces: off and not even imported by default; with the OTEL_* variables, a server span
per HTTP and gRPC request (a child of the caller's traceparent) with the compute inside it,
exported over OTLP to a collector."""

from __future__ import annotations

import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc

from service import tracing
from tests.server_process import ROOT, free_port, service_process

from .conftest import make_client

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
BODY = {"layer": "stream.bn", "mode": "train",
        "tensor": {"shape": [2, 64], "data": [0.5] * 128}}


def test_no_sdk_or_exporter_is_loaded_when_tracing_is_off() -> None:
    # (FastAPI itself imports the OpenTelemetry API when it is installed.)
    script = (
        "import sys\nfrom fastapi.testclient import TestClient\n"
        "from service.app import create_app\nfrom service.settings import Settings\n"
        "with TestClient(create_app(Settings(threads=1, device='cpu'))) as c:\n"
        "    assert c.post('/normalize', json={'layer': 'features.ln', 'tensor': "
        "{'shape': [1, 64], 'data': [1.0] * 64}}).status_code == 200\n"
        "print(sorted(m for m in sys.modules\n"
        "             if m.startswith(('opentelemetry.sdk', 'opentelemetry.exporter'))))\n"
    )
    env = {"PATH": "/usr/bin:/bin", "NORMCORE_GRPC_PORT": "0"}
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", script], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize(("environ", "exporters"), [
    ({}, []),
    ({"OTEL_TRACES_EXPORTER": "none"}, []),
    ({"OTEL_TRACES_EXPORTER": "otlp,console"}, ["otlp", "console"]),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, []),
])
def test_the_environment_decides(environ, exporters) -> None:
    assert tracing.wanted(environ) == exporters


@pytest.mark.parametrize("environ", [
    {"OTEL_TRACES_EXPORTER": "zipkin"},
    {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
])
def test_an_exporter_that_cannot_be_had_is_refused(environ) -> None:
    with pytest.raises(tracing.TracingConfigError):
        tracing.configure(environ)
    tracing.shutdown()


@pytest.fixture
def spans():
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    assert tracing.configure({}, exporters=[exporter])
    yield exporter.get_finished_spans
    tracing.shutdown()


def test_an_http_request_is_a_server_span_with_the_compute_inside(spans) -> None:
    with make_client() as client:
        reply = client.post("/normalize", json=BODY,
                            headers={"traceparent": TRACEPARENT, "X-Request-ID": "t-1"})
        assert reply.status_code == 200
    by_name = {span.name: span for span in spans()}
    server = by_name["POST /normalize"]
    assert server.kind.name == "SERVER"
    assert format(server.context.trace_id, "032x") == TRACE_ID  # the caller's trace
    assert server.attributes["http.route"] == "/normalize"
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["normcore.request_id"] == "t-1"
    assert server.attributes["normcore.layer"] == "stream.bn"
    compute = by_name["normalize"]
    assert compute.parent.span_id == server.context.span_id
    assert compute.attributes["normcore.mode"] == "train"
    assert server.resource.attributes["service.name"] == "normcore"


class _Collector(BaseHTTPRequestHandler):
    """An OTLP/HTTP endpoint that keeps what it is sent."""

    received: list[bytes] = []

    def do_POST(self) -> None:  # noqa: N802 - the handler's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path == "/v1/traces":
            type(self).received.append(body)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def collector():
    _Collector.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _exported(bodies: list[bytes]) -> list[tuple[str, object]]:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    found = []
    for body in bodies:
        for resource_spans in ExportTraceServiceRequest.FromString(body).resource_spans:
            service = {a.key: a.value.string_value
                       for a in resource_spans.resource.attributes}["service.name"]
            found += [(service, span) for scope in resource_spans.scope_spans
                      for span in scope.spans]
    return found


@pytest.mark.slow
def test_a_server_exports_http_and_grpc_spans_over_otlp(collector) -> None:
    grpc_port = free_port()
    env = {"NORMCORE_DEVICE": "cpu", "OTEL_TRACES_EXPORTER": "otlp",
           "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector.server_port}",
           "OTEL_SERVICE_NAME": "normcore-e2e", "OTEL_BSP_SCHEDULE_DELAY": "100"}
    with service_process(["--grpc-port", str(grpc_port)], env=env) as server:
        reply = httpx.post(f"{server.url}/normalize", json=BODY, trust_env=False,
                           headers={"traceparent": TRACEPARENT})
        assert reply.status_code == 200
        with triton_grpc.InferenceServerClient(f"127.0.0.1:{grpc_port}") as client:
            tensor = triton_grpc.InferInput("x", [1, 64], "FP32")
            tensor.set_data_from_numpy(np.ones((1, 64), np.float32))
            client.infer("features.ln", [tensor], headers={"traceparent": TRACEPARENT})
        server.stop()  # flushes the last batch
    spans = _exported(_Collector.received)
    assert {service for service, _ in spans} == {"normcore-e2e"}
    by_name = {span.name: span for _, span in spans}
    for name in ("POST /normalize", "inference.GRPCInferenceService/ModelInfer"):
        server_span = by_name[name]
        assert server_span.trace_id.hex() == TRACE_ID
        children = [s for _, s in spans if s.parent_span_id == server_span.span_id]
        assert [s.name for s in children] == ["normalize"], name
