"""Logging: one JSON object per line (or plain text for a terminal), with the
pod id on every record and bearer tokens redacted from access logs.

Code logs with ``extra={"thread_id": ..., "user_id": ..., "generation_id": ...}``;
those fields become JSON keys.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from typing import Any

import orjson

# Not "thread": LogRecord already has that attribute (the OS thread id).
_CONTEXT_FIELDS = ("thread_id", "user_id", "generation_id")
# token=... in query strings (access logs): never logged.
_TOKEN_IN_QUERY = re.compile(r"(?i)([?&](?:token|access_token)=)[^&\s\"]+")


def redact(text: str) -> str:
    return _TOKEN_IN_QUERY.sub(r"\1[redacted]", text)


class JsonFormatter(logging.Formatter):
    """A record as one JSON line: ts, level, logger, msg, pod, context fields."""

    def __init__(self, pod_id: str) -> None:
        super().__init__()
        self._pod_id = pod_id

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
            "pod": self._pod_id,
        }
        for name in _CONTEXT_FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


class RedactingFormatter(logging.Formatter):
    """Plain text, tokens redacted."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def configure(level: str, pod_id: str, json_lines: bool) -> None:
    """Route our logs and uvicorn's (access logs included) through one handler."""
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(JsonFormatter(pod_id))
    else:
        handler.setFormatter(
            RedactingFormatter(f"%(asctime)s %(levelname)s [{pod_id}] %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
