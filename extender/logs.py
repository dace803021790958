"""Log output of migchain-extender and migchain-returner: text lines or one JSON object per line; no secrets.

`configure` installs one handler on the root logger; `GunicornLogger` puts
gunicorn's error and access logs through the same formatter. In JSON mode
each record is a single line: time, level, logger, message, the record's
`extra` fields, and an exception as a field (its trace escaped, not spread
over lines). Bearer tokens and fields named like credentials are redacted in
both modes, whatever a library puts in a message.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
import sys
import threading
import types
from collections.abc import Mapping
from typing import IO, Any

from gunicorn import glogging

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
REDACTED = "[redacted]"

# An Authorization header's value, wherever it shows up in a message.
_CREDENTIAL = re.compile(
    r"""(?i)(\bbearer\s+|authorization['"]?\s*[:=]\s*['"]?(?:basic\s+|bearer\s+)?)[A-Za-z0-9\-._~+/]+=*"""
)
# `extra` fields (and keys of mappings in them) never written out.
_SECRET_KEY = re.compile(r"(?i)authorization|token|password|secret|api[_-]?key|client[_-]?key|cookie")
# Attributes every LogRecord has; anything else on a record came from `extra`.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}
_CORE = ("time", "level", "logger", "message")


def redact(text: str) -> str:
    return _CREDENTIAL.sub(lambda match: f"{match[1]}{REDACTED}", text)


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {key: REDACTED if _SECRET_KEY.search(str(key)) else _clean(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(item) for item in value]
    return value


def extras(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a caller passed in `extra`, redacted."""
    found = {key: value for key, value in record.__dict__.items() if key not in _STANDARD and not key.startswith("_")}
    cleaned: dict[str, Any] = _clean(found)
    return cleaned


class TextFormatter(logging.Formatter):
    """The classic line (`time LEVEL logger: message`, a trace below it), redacted."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        for key, value in extras(record).items():
            document[f"extra_{key}" if key in _CORE else key] = value
        if record.exc_info:
            error = record.exc_info[1]
            if error is not None:
                document["exception_type"] = type(error).__name__
            document["exception"] = redact(self.formatException(record.exc_info))
        elif record.exc_text:
            document["exception"] = redact(record.exc_text)
        if record.stack_info:
            document["stack"] = redact(self.formatStack(record.stack_info))
        # json escapes the newlines of a trace: one record, one line.
        return json.dumps(document, default=str, ensure_ascii=False, separators=(",", ":"))


def formatter(log_format: str) -> logging.Formatter:
    if log_format not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {log_format!r}")
    return JsonFormatter() if log_format == "json" else TextFormatter()


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is when a record comes (as logging's last-resort handler does)."""

    @property
    def stream(self) -> IO[str]:
        return sys.stderr

    @stream.setter
    def stream(self, _: IO[str]) -> None:
        pass


def configure(level: str, log_format: str, stream: IO[str] | None = None) -> logging.Handler:
    """Send every log record of the process to `stream` (stderr) in `log_format`; returns the handler."""
    handler: logging.Handler = logging.StreamHandler(stream) if stream is not None else _Stderr()
    handler.setFormatter(formatter(log_format))
    handler._migchain = True  # type: ignore[attr-defined]  # to find it again on a second call
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_migchain", False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    if log_format == "json":
        # An exception nobody caught would print its trace over many lines: log it as one record instead.
        sys.excepthook = _log_uncaught
        threading.excepthook = lambda hook: _log_uncaught(hook.exc_type, hook.exc_value, hook.exc_traceback)
    return handler


def _log_uncaught(kind: type[BaseException], error: BaseException | None, trace: types.TracebackType | None) -> None:
    if isinstance(error, KeyboardInterrupt):
        sys.__excepthook__(kind, error, trace)  # Ctrl-C stays the short, familiar exit
        return
    logger = logging.getLogger("migchain")
    if error is None:
        logger.critical("uncaught %s", kind.__name__)
    else:
        logger.critical("uncaught exception: %s", error, exc_info=(kind, error, trace))


def _root_formatter() -> logging.Formatter | None:
    for handler in logging.getLogger().handlers:
        if getattr(handler, "_migchain", False):
            return handler.formatter
    return None


class GunicornLogger(glogging.Logger):  # type: ignore[misc]  # gunicorn ships no type hints
    """gunicorn's logger with the process's formatter on its handlers, and access lines with fields.

    The access line never carries request headers (an Authorization header
    among them): method, path, status, size, duration, client address.
    """

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        chosen = _root_formatter()
        if chosen is not None:
            for log in (self.error_log, self.access_log):
                for handler in log.handlers:
                    handler.setFormatter(chosen)

    def access(self, resp: Any, req: Any, environ: Mapping[str, Any], request_time: datetime.timedelta) -> None:
        if not self.access_log_enabled:
            return
        status = resp.status.split(None, 1)[0] if isinstance(resp.status, str) else resp.status
        fields = {
            "remote": environ.get("REMOTE_ADDR", "-"),
            "method": environ.get("REQUEST_METHOD", ""),
            "path": environ.get("PATH_INFO", ""),
            "status": int(status),
            "bytes": getattr(resp, "sent", None),
            "duration_seconds": round(request_time.total_seconds(), 6),
        }
        self.access_log.info(
            "%s %s %s %s %s %sB %.1fms",
            fields["remote"],
            fields["method"],
            fields["path"],
            fields["status"],
            environ.get("SERVER_PROTOCOL", ""),
            fields["bytes"] if fields["bytes"] is not None else "-",
            request_time.total_seconds() * 1000,
            extra=fields,
        )
