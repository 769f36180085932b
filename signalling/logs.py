"""The server's log output: ``text`` (one readable line per record) or ``json`` (one JSON object
per line, for a log collector), and the ids every line carries.

One mechanism carries the ids: a context variable. :func:`bind` adds ids (``session_id``,
``connection_id``) to the current asyncio task's context — the WebSocket handler's task once its
connection has joined, a relayed connection's task likewise — so every line logged by that task,
and by tasks it starts afterwards (its peer connections' work), names them. :func:`bind_process`
sets what is the same for the whole process (``node_id``, ``worker``). A :class:`ContextFilter`
on the handler copies them onto each record; an id passed with ``extra=`` wins.

A JSON line::

    {"time": "2026-11-29T18:02:03.123Z", "level": "INFO", "logger": "signalling.hub",
     "message": "joined: ...", "node_id": "node_3f...", "session_id": "s_...", "connection_id": "c_..."}

plus ``exception`` (the formatted traceback) when the record has one. Ids that are not known are
left out, never null.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Final, TextIO

#: The id fields, in the order a JSON line shows them.
ID_FIELDS: Final = ("node_id", "worker", "session_id", "connection_id")
LOG_FORMATS: Final = ("text", "json")
TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_context: ContextVar[Mapping[str, str]] = ContextVar("openconsult_log_ids", default={})
_process: dict[str, str] = {}


def bind(**ids: str | None) -> None:
    """Add ``ids`` to the current context (a None value removes that id)."""
    merged = {**_context.get(), **{k: v for k, v in ids.items() if v is not None}}
    for key in [k for k, v in ids.items() if v is None]:
        merged.pop(key, None)
    _context.set(merged)


def bind_process(**ids: str) -> None:
    """Ids of the whole process (``node_id``, ``worker``), on every line from now on."""
    _process.update(ids)


def current() -> dict[str, str]:
    """The ids a line logged here and now carries."""
    return {**_process, **_context.get()}


class ContextFilter(logging.Filter):
    """Puts the bound ids on each record (as attributes), unless ``extra=`` set them already."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in current().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ms), level, logger, message, the ids, exception."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ID_FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                line[key] = str(value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def configure(log_format: str, level: str | int = logging.INFO, stream: TextIO | None = None,
              label: str = "") -> logging.Handler:
    """Send every log record (Python warnings included) to ``stream`` (stderr) in ``log_format``;
    ``label`` (e.g. ``"worker 1: "``) goes before the logger's name on text lines (JSON lines
    carry the process's ids as fields instead)."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f'log format must be one of {", ".join(LOG_FORMATS)}, got "{log_format}"')
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT.replace("%(name)s", label + "%(name)s")))
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
    return handler
