"""Logging: one line per event, as text or JSON (``SYNC_LOG_FORMAT``).

Structured fields go in ``extra={"fields": {...}}``; they are appended as ``key=value`` in text and
as keys in JSON. Nothing secret is ever passed here (keys are files; only their paths are logged).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

__all__ = ["get", "setup"]

_ROOT = "upsync"


def _fmt_value(value: Any) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' "=\n\t'):
        return json.dumps(text, ensure_ascii=False)
    return text


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = f"{stamp}.{int(record.msecs):03d}Z {record.levelname:<7} {record.getMessage()}"
        fields = getattr(record, "fields", None)
        if fields:
            line += " " + " ".join(f"{k}={_fmt_value(v)}" for k, v in fields.items())
        if record.exc_info and record.levelno >= logging.ERROR:
            line += " | " + self.formatException(record.exc_info).replace("\n", " | ")
        return line


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
        }
        doc.update(getattr(record, "fields", None) or {})
        if record.exc_info and record.levelno >= logging.ERROR:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False, default=str)


def setup(fmt: str = "text", level: str = "info") -> None:
    """Send the package's logs to stderr in ``fmt`` ("text" or "json") from ``level`` up."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    root = logging.getLogger(_ROOT)
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    # watchfiles logs every watcher timeout at debug level; it has nothing the operator needs.
    logging.getLogger("watchfiles").setLevel(logging.WARNING)


def get(name: str) -> logging.Logger:
    """The logger for one module of the package."""
    return logging.getLogger(f"{_ROOT}.{name}")
