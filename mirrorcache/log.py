"""structlog set-up: JSON lines in production, console output on a TTY, secrets redacted.

Event names are stable and dotted (``request.finished``, ``upstream.request``,
``blob.committed``, ``policy.denied``, ...); fields carry the values.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_SECRET_KEYS = re.compile(r"(?i)authorization|password|passwd|secret|token|credential|cookie")
_SECRET_VALUES = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+")
REDACTED = "[REDACTED]"


def _scrub(value: Any, depth: int = 0) -> Any:
    if isinstance(value, str):
        return _SECRET_VALUES.sub(r"\1 " + REDACTED, value) if _SECRET_VALUES.search(value) \
            else value
    if depth > 8:
        return value
    if isinstance(value, dict):
        return {k: REDACTED if isinstance(k, str) and _SECRET_KEYS.search(k)
                else _scrub(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_scrub(v, depth + 1) for v in value)
    return value


def redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Remove credentials and tokens from any event, whatever field they hide in."""
    for key, value in list(event.items()):
        if key != "event" and _SECRET_KEYS.search(key):
            event[key] = REDACTED
        else:
            event[key] = _scrub(value)
    return event


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
