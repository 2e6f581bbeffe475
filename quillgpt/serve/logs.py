"""Structured logs: one JSON object per line (or plain text), each carrying the request id.

The request id comes from a context variable set by the request middleware, so every log line
written while serving a request — in routes, dependencies or error handlers — names its request.
Extra fields go in `extra={"fields": {...}}`.
"""

from __future__ import annotations

import json
import logging
import time
from contextvars import ContextVar

request_id: ContextVar[str | None] = ContextVar("quill_request_id", default=None)


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if rid := request_id.get():
            data["request_id"] = rid
        data.update(getattr(record, "fields", {}))
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = dict(getattr(record, "fields", {}))
        if rid := request_id.get():
            fields = {"request_id": rid, **fields}
        return line + "".join(f" {k}={v}" for k, v in fields.items())


def configure_logging(level: str = "info", json_lines: bool = True) -> None:
    """Send QuillGPT's and uvicorn's logs to stderr in one format. Called by `setup_process`, not on import."""
    handler = logging.StreamHandler()
    handler.setFormatter(JSONFormatter() if json_lines else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
