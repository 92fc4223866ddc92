"""structlog set-up: JSON lines in production, console output on a TTY, secrets redacted.

Event names are stable and dotted (``request.finished``, ``upstream.request``,
``blob.committed``, ``policy.denied``, ...); fields carry the values.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_SECRET_KEYS = re.compile(r"(?i)authorization|password|passwd|secret|token|credential|cookie")
_SECRET_VALUES = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+")
REDACTED = "[REDACTED]"


#: Values that can hide no credential, passed through without a look.
_SCALARS = (int, float, bool, type(None))


@functools.lru_cache(maxsize=1024)
def _secret_key(key: str) -> bool:
    """Field names come from the code, a handful per event: each is matched once."""
    return _SECRET_KEYS.search(key) is not None


def _scrub(value: Any, depth: int = 0) -> Any:
    if isinstance(value, str):
        return _SECRET_VALUES.sub(r"\1 " + REDACTED, value) if _SECRET_VALUES.search(value) \
            else value
    if type(value) in _SCALARS or depth > 8:
        return value
    if isinstance(value, dict):
        return {k: REDACTED if isinstance(k, str) and _SECRET_KEYS.search(k)
                else _scrub(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_scrub(v, depth + 1) for v in value)
    return value


def _may_hold_credential(text: str) -> bool:
    """Whether :data:`_SECRET_VALUES` may match in ``text`` (never False when it does). Most
    events hold no credential at all: one look over all their strings together shows it, and
    a match across two fields only costs the field-by-field pass. ASCII text (the usual) is
    searched for the scheme names as plain substrings, faster than the regex."""
    if text.isascii():
        low = text.lower()
        return "bearer" in low or "basic" in low
    return _SECRET_VALUES.search(text) is not None


def redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Remove credentials and tokens from any event, whatever field they hide in."""
    strings: list[str] = []
    scan = False  # a nested value, or a string that may hold a credential
    for key, value in event.items():
        if key != "event" and _secret_key(key):
            scan = True
        elif isinstance(value, str):
            strings.append(value)
        elif type(value) not in _SCALARS:
            scan = True
    if not scan and not _may_hold_credential("\n".join(strings)):
        return event
    for key, value in list(event.items()):
        if key != "event" and _secret_key(key):
            event[key] = REDACTED
        else:
            scrubbed = _scrub(value)
            if scrubbed is not value:
                event[key] = scrubbed
    return event


def redact_query(query: str) -> str:
    """A query string for the logs, with the values of secret-looking parameters removed."""
    if not _SECRET_KEYS.search(query):
        return query
    parts = []
    for part in query.split("&"):
        key, sep, _ = part.partition("=")
        parts.append(f"{key}={REDACTED}" if sep and _SECRET_KEYS.search(key) else part)
    return "&".join(parts)


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    """Configure structlog (and route stdlib logging through the same level)."""
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: Any = (
        structlog.dev.ConsoleRenderer() if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    numeric = getattr(logging, level.upper(), logging.INFO)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=sys.stderr)


class ProtocolLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """For aiohttp's connection handler: malformed requests (bad request line, oversized or
    invalid headers) become one ``http.protocol_error`` event, never a traceback, so hostile
    clients cannot fill the logs with stack dumps."""

    def __init__(self) -> None:
        super().__init__(logging.getLogger("mirrorcache.http"), {})
        self._events = structlog.get_logger("mirrorcache.http")

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info")
        if exc is True:
            exc = sys.exc_info()[1]
        error = (" ".join(str(exc).split())[:200] if isinstance(exc, BaseException) else None)
        text = str(msg) % args if args else str(msg)
        event = self._events.info if level >= logging.ERROR else self._events.debug
        event("http.protocol_error", message=text[:200], error=error,
              error_type=type(exc).__name__ if isinstance(exc, BaseException) else None)
