"""Logging: stdlib ``logging`` to stderr, text or JSON, every line carrying the run id when there is one, and the
database when a command works on a fleet's (set by the thread working on it)."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from datetime import UTC, datetime

from .dsn import redact

current_run: contextvars.ContextVar[str | None] = contextvars.ContextVar("reconciler_run_id", default=None)
current_database: contextvars.ContextVar[str | None] = contextvars.ContextVar("reconciler_database", default=None)


class _RunIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.run_id = current_run.get()
        record.database = current_database.get()
        return True


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        run, database = getattr(record, "run_id", None), getattr(record, "database", None)
        prefix = (f"[{database}] " if database else "") + (f"[run {run[:8]}] " if run else "")
        text = f"{record.levelname.lower()}: {prefix}{record.getMessage()}"
        if record.exc_info:  # --debug logs the traceback of an expected error this way
            text += "\n" + self.formatException(record.exc_info)
        return redact(text)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        database = getattr(record, "database", None)
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "run_id": getattr(record, "run_id", None),
            **({"database": database} if database else {}),
            "message": redact(record.getMessage()),
        }
        if record.exc_info:
            entry["traceback"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry)


def setup(fmt: str = "text", verbosity: int = 0) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RunIdFilter())
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    root = logging.getLogger("reconciler")
    root.handlers[:] = [handler]
    root.propagate = False
    root.setLevel(logging.DEBUG if verbosity > 1 else logging.INFO if verbosity == 1 or fmt == "json" else logging.WARNING)
