"""Log lines that say which request, user and turn they belong to.

`LOGGING` (pantheon/settings.py) sends every record to one handler on the root logger, with
`JsonFormatter` (one JSON object per line, the production default) or `TextFormatter`
(readable lines, the local default). Both add the fields of the current `LogContext`:
`request_id`, `user_id` and `turn_id`, when known.

A `LogContext` is made per request by `core.middleware.RequestLogMiddleware` and held in a
context variable. It is mutable and shared, on purpose: code that learns the turn or the
user (`bind_log_context`) fills in the request's one object, so the access line written
when the response ends carries them too, and so do the tasks the request started (asyncio
tasks and `sync_to_async` threads copy the context variable, which still points at it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any


@dataclasses.dataclass(slots=True)
class LogContext:
    request_id: str | None = None
    user_id: int | None = None
    turn_id: str | None = None


_current: ContextVar[LogContext | None] = ContextVar("pantheon_log_context", default=None)
CONTEXT_FIELDS = ("request_id", "user_id", "turn_id")


def current_log_context() -> LogContext | None:
    return _current.get()


def begin_log_context(request_id: str):
    """A fresh context for one request; returns (context, token for `_current.reset`)."""
    context = LogContext(request_id=request_id)
    return context, _current.set(context)


def end_log_context(token) -> None:
    _current.reset(token)


def bind_log_context(*, user_id: int | None = None, turn_id: Any = None) -> None:
    """Record the user or the turn of the current request (no-op outside one)."""
    context = _current.get()
    if context is None:
        return
    if user_id is not None:
        context.user_id = user_id
    if turn_id is not None:
        context.turn_id = str(turn_id)


@contextlib.contextmanager
def log_context(**fields: Any) -> Iterator[LogContext]:
    """A context of its own for work outside a request (a task, a command)."""
    context = LogContext(**{k: (str(v) if k == "turn_id" and v is not None else v) for k, v in fields.items()})
    token = _current.set(context)
    try:
        yield context
    finally:
        _current.reset(token)


# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "taskName",
    "color_message",  # uvicorn's copy of the message with terminal colours
}
_SCALARS = (str, int, float, bool)


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    """The context fields, then the record's own `extra` (which wins), scalars only."""
    fields: dict[str, Any] = {}
    context = _current.get()
    if context is not None:
        for name in CONTEXT_FIELDS:
            value = getattr(context, name)
            if value is not None:
                fields[name] = value
    for name, value in record.__dict__.items():
        if name in _STANDARD or name.startswith("_"):
            continue
        if value is None or isinstance(value, _SCALARS):
            fields[name] = value
    return fields


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC), level, logger, message, the context fields,
    the record's `extra` fields, and `exc` (the traceback, as one string) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(_fields(record))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """`2025-01-31 12:00:00,123 INFO logger: message  [request_id=... user_id=3]`."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = _current.get()
        if context is None:
            return line
        tags = " ".join(f"{name}={getattr(context, name)}" for name in CONTEXT_FIELDS
                        if getattr(context, name) is not None)
        if not tags:
            return line
        first, newline, rest = line.partition("\n")  # after the message, before a traceback
        return f"{first}  [{tags}]{newline}{rest}"
