"""Logging: one line per event on stderr, in one of three shapes.

- text (a terminal): ``2026-11-28T09:00:00Z INFO appliance.x: message``
- journal (``$JOURNAL_STREAM`` set, i.e. stderr goes to journald): ``<6>appliance.x: message``;
  journald reads the ``<N>`` prefix as the syslog priority and adds its own timestamp.
- json (``--log-format json``, for shipping): one JSON object per line.

Tracebacks stay on the same line (newlines escaped) so one event is one line everywhere.
Credentials in URLs (``http://user:pass@proxy:3128``) are masked in every line, whatever
logged them (``appliance.protocol.redact``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Mapping

from appliance.protocol.redact import redact_text

__all__ = ["setup_logging"]

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def _one_line(text: str) -> str:
    return text.replace("\r", "").replace("\n", "\\n")


class _TextFormatter(logging.Formatter):
    def __init__(self, *, journal: bool) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += " " + self.formatException(record.exc_info)
        message = redact_text(_one_line(message))
        if self.journal:
            return f"<{_PRIORITY.get(record.levelno, 6)}>{record.name}: {message}"
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created))
        return f"{stamp} {record.levelname} {record.name}: {message}"


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, object] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact_text(record.getMessage()),
        }
        if record.exc_info:
            data["exc"] = redact_text(self.formatException(record.exc_info))
        return json.dumps(data, ensure_ascii=False)


def setup_logging(level: str, fmt: str, env: Mapping[str, str] = os.environ) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter(journal=bool(env.get("JOURNAL_STREAM"))))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # hypercorn logs every connection error at INFO; keep the journal for what matters.
    logging.getLogger("appliance.http").setLevel(max(logging.WARNING, root.level))
    # httpx logs every request at INFO: a line per sync poll and per shipped log batch
    # (which would then be shipped in turn). The services log what matters themselves.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, root.level))
