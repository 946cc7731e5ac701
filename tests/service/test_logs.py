"""Logs: text by default, one JSON object per line with --log-format json; one access line
per request with its id, route, status, latency and layer."""

from __future__ import annotations

import io
import json
import logging

import httpx
import pytest

from service import logs
from service.context import REQUEST_ID
from tests.server_process import service_process

from .conftest import make_client


@pytest.fixture
def access_lines():
    """What the access logger writes, through the JSON formatter, as parsed objects."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    logs.ACCESS.addHandler(handler)
    level = logs.ACCESS.level
    logs.ACCESS.setLevel(logging.INFO)
    try:
        yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    finally:
        logs.ACCESS.removeHandler(handler)
        logs.ACCESS.setLevel(level)


def _record(message: str, **extra) -> logging.LogRecord:
    record = logging.LogRecord("normcore.test", logging.ERROR, __file__, 1, message, (), None)
    record.__dict__.update(extra)
    return record


def test_a_json_line_is_one_object_with_the_fields() -> None:
    token = REQUEST_ID.set("rid-7")
    try:
        line = logs.JsonFormatter().format(_record("two\nlines", status=404, layer="x"))
    finally:
        REQUEST_ID.reset(token)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "two\nlines"
    assert (entry["level"], entry["request_id"], entry["status"], entry["layer"]) == (
        "error", "rid-7", 404, "x")
    assert entry["time"].endswith("Z")


def test_a_traceback_stays_on_the_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError as exc:
        record = _record("failed", exc_info=(type(exc), exc, exc.__traceback__))
    entry = json.loads(logs.JsonFormatter().format(record))
    assert "ValueError: boom" in entry["exception"]


def test_a_text_line_ends_with_the_request_id() -> None:
    token = REQUEST_ID.set("rid-8")
    try:
        assert logs.TextFormatter().format(_record("hello")).endswith("hello [rid-8]")
    finally:
        REQUEST_ID.reset(token)


def test_each_request_writes_one_access_line(access_lines) -> None:
    with make_client() as client:
        reply = client.post("/normalize", headers={"X-Request-ID": "acc-1"}, json={
            "layer": "stream.bn", "mode": "train",
            "tensor": {"shape": [2, 64], "data": [0.5] * 128}})
        assert reply.status_code == 200
        client.get("/stats/no.such", headers={"X-Request-ID": "acc-2"})
    lines = {line["request_id"]: line for line in access_lines()}
    first = lines["acc-1"]
    assert (first["route"], first["status"], first["layer"], first["mode"]) == (
        "/normalize", 200, "stream.bn", "train")
    assert first["latency_ms"] > 0
    assert (lines["acc-2"]["route"], lines["acc-2"]["status"]) == ("/stats/{name}", 404)


def test_a_path_cannot_forge_a_log_line() -> None:
    record = []
    handler = logging.Handler()
    handler.emit = record.append
    logs.ACCESS.addHandler(handler)
    logs.ACCESS.setLevel(logging.INFO)
    try:
        logs.access("GET", "/a\nINFO fake: line", "unmatched", 404, 0.001)
    finally:
        logs.ACCESS.removeHandler(handler)
        logs.ACCESS.setLevel(logging.NOTSET)
    assert "\n" not in record[0].getMessage()


@pytest.mark.slow
def test_a_server_logs_json_lines_with_request_ids() -> None:
    with service_process(["--log-format", "json"], env={"NORMCORE_DEVICE": "cpu"}) as server:
        reply = httpx.post(f"{server.url}/normalize", headers={"X-Request-ID": "json-1"},
                           trust_env=False, json={
                               "layer": "features.ln",
                               "tensor": {"shape": [1, 64], "data": [1.0] * 64}})
        assert reply.status_code == 200
        assert reply.headers["x-request-id"] == "json-1"
        server.stop()
        lines = [json.loads(line) for line in server.log(1 << 20).splitlines() if line]
    assert any("Uvicorn running on" in line["message"] for line in lines)
    access = [line for line in lines if line.get("request_id") == "json-1"]
    assert len(access) == 1
    assert access[0]["logger"] == "normcore.access"
    assert (access[0]["route"], access[0]["status"], access[0]["layer"]) == (
        "/normalize", 200, "features.ln")
