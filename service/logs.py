"""Log lines, as text (the default) or JSON (``log_format``), and the access log.

Text is ``time LEVEL logger: message``; JSON is one object per line::

    {"time": "2026-01-02T03:04:05.678Z", "level": "info", "logger": "normcore.access",
     "message": "POST /normalize 200", "request_id": "...", "route": "/normalize",
     "status": 200, "latency_ms": 0.42, "layer": "stream.bn", "mode": "train"}

Every line written while a request is served carries its id (``service.context``). Each
served request gets one access line (``access``), from whichever transport served it; the
fields are passed as ``extra`` and only the JSON format spells all of them out.
"""

from __future__ import annotations

import logging
import logging.config
import time
from typing import Any

import orjson

from .context import REQUEST_ID

ACCESS = logging.getLogger("normcore.access")
# Fields an access line (or any record) may carry as ``extra``, in the order JSON gives them.
FIELDS = ("method", "route", "path", "status", "latency_ms", "layer", "mode", "peer")
LEVELS = {"critical": 50, "error": 40, "warning": 30, "info": 20, "debug": 10, "trace": 5}


def _request_id(record: logging.LogRecord) -> str | None:
    return getattr(record, "request_id", None) or REQUEST_ID.get()


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message [request_id]``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        request_id = _request_id(record)
        return line if request_id is None else f"{line} [{request_id}]"


class JsonFormatter(logging.Formatter):
    """One JSON object per line; newlines in messages and tracebacks are escaped."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = _request_id(record)
        if request_id is not None:
            entry["request_id"] = request_id
        for key in FIELDS:
            value = getattr(record, key, None)
            if value is not None and value != "":
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def logging_config(level: str = "info", log_format: str = "text") -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for the process: one handler on stderr, in
    ``log_format``; uvicorn's loggers write through it too."""
    formatter = JsonFormatter if log_format == "json" else TextFormatter
    number = LEVELS[level]
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"normcore": {"()": formatter}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "normcore",
                                "stream": "ext://sys.stderr"}},
        "root": {"handlers": ["stderr"], "level": number},
        "loggers": {name: {"level": number, "handlers": [], "propagate": True}
                    for name in ("uvicorn", "uvicorn.error", "normcore")},
    }


def configure(level: str = "info", log_format: str = "text") -> None:
    logging.config.dictConfig(logging_config(level, log_format))


def access(method: str, path: str, route: str, status: int | str, seconds: float,
           layer: str = "", mode: str = "") -> None:
    """The access line of one served request."""
    if not ACCESS.isEnabledFor(logging.INFO):
        return
    latency_ms = round(seconds * 1000, 3)
    path = ascii(path[:256])[1:-1]  # a client's text: no newline or escape gets through
    tail = "".join(f" {k}={v}" for k, v in (("layer", layer), ("mode", mode)) if v)
    ACCESS.info("%s %s %s %.3f ms%s", method, path, status, latency_ms, tail,
                extra={"method": method, "route": route, "path": path, "status": status,
                       "latency_ms": latency_ms, "layer": layer, "mode": mode})
