"""Structured logging: the only module that configures the `logging` tree.

Two outputs: rich's console handler for people at a terminal, one JSON object per line for
log collectors. Both show the same structured fields: whatever callers pass in `extra=`,
plus the instance id and the `log_context` fields (queue, message id) that a handler-level
filter copies onto every record, including records logged by the user's handler code.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, TextIO

from rich.console import Console
from rich.logging import RichHandler

LEVELS: Mapping[str, int] = MappingProxyType(
    {
        "debug": logging.DEBUG,
        "info": logging.INFO,
        "warning": logging.WARNING,
        "error": logging.ERROR,
        "critical": logging.CRITICAL,
    }
)
LOG_FORMATS = ("auto", "console", "json")

# Their DEBUG output carries request/response bodies and receipt handles.
QUIET_LOGGERS = ("botocore", "boto3", "urllib3", "s3transfer", "werkzeug")

# Attributes every LogRecord has; anything else on a record came from `extra` or the filter.
_RECORD_ATTRIBUTES = frozenset(
    {
        "name", "msg", "args", "levelname", "levelno", "pathname", "filename", "module",
        "exc_info", "exc_text", "stack_info", "lineno", "funcName", "created", "msecs",
        "relativeCreated", "thread", "threadName", "processName", "process", "taskName",
        "message", "asctime",
    }
)  # fmt: skip
# Keys the JSON formatter writes itself; a colliding field is renamed, not dropped.
_JSON_KEYS = frozenset({"ts", "level", "logger", "msg", "exc_type", "exc", "stack"})

_context: contextvars.ContextVar[Mapping[str, object]] = contextvars.ContextVar(
    "sqsbalancerd_log_context", default=MappingProxyType({})
)


class _Binding:
    """Process-wide fields: threads do not inherit contextvars, the instance id must reach all."""

    instance_id: str | None = None


def bind_instance(instance_id: str | None) -> None:
    """Stamp every later record, from every thread, with `instance_id` (None unbinds)."""
    _Binding.instance_id = instance_id


@contextmanager
def log_context(**fields: object) -> Iterator[None]:
    """Add `fields` to every record logged in this context (this thread or task); nests."""
    token = push_context(fields)
    try:
        yield
    finally:
        _context.reset(token)


def push_context(fields: Mapping[str, object]) -> contextvars.Token[Mapping[str, object]]:
    """`log_context` without the generator, for the worker's per-message path (one call
    each way instead of a context manager's half dozen); undo with `pop_context`."""
    current = _context.get()
    return _context.set(MappingProxyType({**current, **fields} if current else dict(fields)))


def pop_context(token: contextvars.Token[Mapping[str, object]]) -> None:
    _context.reset(token)


def current_context() -> dict[str, object]:
    """The fields `log_context` currently adds, e.g. to carry them to another thread."""
    return dict(_context.get())


class ContextFilter(logging.Filter):
    """Copies the instance id and the `log_context` fields onto each record.

    Installed on the handler, not a logger: logger filters skip records propagated from
    child loggers, and the user's handler logs under names we do not know.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        fields: dict[str, object] = {}
        if _Binding.instance_id is not None:
            fields["instance_id"] = _Binding.instance_id
        fields.update(_context.get())
        for key, value in fields.items():
            # An explicit `extra=` is more specific than the surrounding context.
            if value is not None and key not in record.__dict__:
                setattr(record, key, value)
        return True


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields of a record: everything that is not a standard attribute."""
    return {
        key: value
        for key, value in record.__dict__.items()
        if key not in _RECORD_ATTRIBUTES and not key.startswith("_")
    }


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (ISO-8601 UTC), level, logger, msg, then the fields."""

    def format(self, record: logging.LogRecord) -> str:
        created = datetime.fromtimestamp(record.created, tz=UTC)
        payload: dict[str, Any] = {
            "ts": created.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record_fields(record).items():
            payload[f"field_{key}" if key in _JSON_KEYS else key] = value
        if record.exc_info and record.exc_info[0] is not None:
            payload["exc_type"] = record.exc_info[0].__name__
            payload["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            payload["stack"] = self.formatStack(record.stack_info)
        # default=str: a field that JSON cannot encode must not lose the whole line.
        return json.dumps(payload, default=str, ensure_ascii=False)


class ConsoleFormatter(logging.Formatter):
    """`logger: message key=value ...`; rich adds the time, the level and tracebacks."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        text = f"{record.name}: {record.getMessage()}"
        fields = record_fields(record)
        if fields:
            text += " " + " ".join(f"{key}={value}" for key, value in fields.items())
        return text


# Own subclasses mark the handlers this module installed: reconfiguring replaces them only,
# leaving handlers others added (pytest's capture, say) alone.
class _JsonHandler(logging.StreamHandler[TextIO]):
    pass


class _ConsoleHandler(RichHandler):
    pass


def _is_tty(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _build_handler(log_format: str, stream: TextIO) -> logging.Handler:
    if log_format == "auto":
        log_format = "console" if _is_tty(stream) else "json"
    handler: logging.Handler
    if log_format == "console":
        console = Console(file=stream, stderr=stream is sys.stderr)
        handler = _ConsoleHandler(console=console, show_path=False, rich_tracebacks=True)
        handler.setFormatter(ConsoleFormatter())
    else:
        handler = _JsonHandler(stream)
        handler.setFormatter(JsonFormatter())
    handler.addFilter(ContextFilter())
    return handler


def _validate(level: str, log_format: str) -> int:
    if level.lower() not in LEVELS:
        raise ValueError(f"unknown log level {level!r}; expected one of {', '.join(LEVELS)}")
    if log_format not in LOG_FORMATS:
        raise ValueError(f"unknown log format {log_format!r}; expected one of {LOG_FORMATS}")
    return LEVELS[level.lower()]


def configure_logging(
    *,
    level: str = "info",
    log_format: str = "auto",
    instance_id: str | None = None,
    stream: TextIO | None = None,
) -> None:
    """Install one handler on the root logger; calling again replaces it.

    The root (and so the user's handler logs) and the `sqsbalancerd` tree log at `level`;
    the AWS/HTTP libraries in `QUIET_LOGGERS` stay at WARNING whatever `level` is.
    """
    level_no = _validate(level, log_format)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _JsonHandler | _ConsoleHandler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(_build_handler(log_format, stream or sys.stderr))
    root.setLevel(level_no)
    logging.getLogger("sqsbalancerd").setLevel(level_no)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    if instance_id is not None:
        bind_instance(instance_id)
