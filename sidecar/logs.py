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


_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(c: str) -> str:
    if c in _ESCAPES:
        return _ESCAPES[c]
    if c.isprintable():
        return c
    code = ord(c)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _fmt_value(value: Any) -> str:
    """A field value on one line: quoted (and escaped) when it has spaces, quotes, ``=`` or anything that is
    not printable. File names come from whoever writes the uploads: a name holding a newline, an escape
    sequence for the terminal or a bidi override must not forge or hide log lines.

    Example:
        >>> _fmt_value("plain.jpg"), _fmt_value("a b"), _fmt_value("x\\x1b[2Jy\\u202e")
        ('plain.jpg', '"a b"', '"x\\\\x1b[2Jy\\\\u202e"')
    """
    text = str(value)
    if text and all(c.isprintable() and c not in ' "=\\' for c in text):
        return text
    return '"' + "".join(_escape(c) for c in text) + '"'


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
