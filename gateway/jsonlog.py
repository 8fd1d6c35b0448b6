"""Structured JSON-lines logging on stderr, and the one redaction helper for secrets.

Every log line is one JSON object: ts (UTC, ISO 8601), level, logger, event, then fields.
Fields whose name says they hold a secret are redacted here, whoever logs them, so a
careless call site cannot leak a key, a token, a password or a database URL's password.
"""

from __future__ import annotations

import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

import msgspec

# Field names (or suffixes) whose values are secrets. A meter token is bearer value.
_SECRET_NAME = re.compile(
    r"(key|token|password|passwd|secret|pin|mac|proof|cookie|authorization|credential)s?$",
    re.IGNORECASE,
)
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://[^:/@\s]*):[^@/\s]*@", re.IGNORECASE)
_encoder = msgspec.json.Encoder()


_MASKED_TOKEN = re.compile(r"\*+[0-9]{4}")


def redact_token(token: str) -> str:
    """Show a meter token as its last 4 digits only: enough for support, useless to a thief.

    A token masked already stays as it is (a call site that masks, then the formatter)."""
    if _MASKED_TOKEN.fullmatch(token):
        return token
    digits = "".join(ch for ch in token if ch.isdigit())
    if len(digits) <= 4:
        return "****"
    return "*" * (len(digits) - 4) + digits[-4:]


def redact_url(url: str) -> str:
    return _URL_PASSWORD.sub(r"\g<scheme>:***@", url)


def redact(name: str, value: Any) -> Any:
    """Return value fit for a log line under field `name`."""
    if value is None:
        return None
    if _SECRET_NAME.search(name):
        if "token" in name.lower() and isinstance(value, str):
            return redact_token(value)
        return "[redacted]"
    if isinstance(value, str) and "://" in value:
        return redact_url(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"
    return value


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            for name, value in fields.items():
                line[name] = redact(name, value)
        if record.exc_info and record.exc_info[0] is not None:
            line["exception"] = record.exc_info[0].__name__
        return _encoder.encode(line).decode()


class EventLogger:
    """A logger whose calls are `log.info("topped_up", terminal_id=..., amount_minor=...)`."""

    __slots__ = ("_logger",)

    def __init__(self, name: str) -> None:
        self._logger = logging.getLogger(name)

    def _log(self, level: int, event: str, fields: dict[str, Any], exc_info: bool = False) -> None:
        if self._logger.isEnabledFor(level):
            self._logger.log(level, event, extra={"fields": fields}, exc_info=exc_info)

    def debug(self, event: str, **fields: Any) -> None:
        self._log(logging.DEBUG, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log(logging.ERROR, event, fields)

    def exception(self, event: str, **fields: Any) -> None:
        self._log(logging.ERROR, event, fields, exc_info=True)


def get_logger(name: str) -> EventLogger:
    return EventLogger(name)


def configure_logging(level: str = "info", stream: Any = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
