"""The OCI error-code table and the one place that renders error responses.

Handlers and services raise :class:`OCIError`; :func:`error_middleware` turns it (and any
unexpected exception, without a traceback) into ``{"errors": [{"code", "message", "detail"}]}``.
"""

from __future__ import annotations

import errno
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import structlog
from aiohttp import web

log = structlog.get_logger("mirrorcache.errors")


@dataclass(frozen=True, slots=True)
class ErrorCode:
    """An error code from the distribution spec, with its default message and HTTP status."""

    code: str
    message: str
    status: int


_CODES = [
    ErrorCode("BLOB_UNKNOWN", "blob unknown to registry", 404),
    ErrorCode("BLOB_UPLOAD_INVALID", "blob upload invalid", 400),
    ErrorCode("BLOB_UPLOAD_UNKNOWN", "blob upload unknown to registry", 404),
    ErrorCode("DIGEST_INVALID", "provided digest did not match uploaded content", 400),
    ErrorCode("MANIFEST_BLOB_UNKNOWN", "manifest references a manifest or blob unknown", 404),
    ErrorCode("MANIFEST_INVALID", "manifest invalid", 400),
    ErrorCode("MANIFEST_UNKNOWN", "manifest unknown to registry", 404),
    ErrorCode("NAME_INVALID", "invalid repository name", 400),
    ErrorCode("NAME_UNKNOWN", "repository name not known to registry", 404),
    ErrorCode("SIZE_INVALID", "provided length did not match content length", 400),
    ErrorCode("TAG_INVALID", "manifest tag did not match URI", 400),
    ErrorCode("UNAUTHORIZED", "authentication required", 401),
    ErrorCode("DENIED", "requested access to the resource is denied", 403),
    ErrorCode("UNSUPPORTED", "the operation is unsupported", 405),
    ErrorCode("TOOMANYREQUESTS", "too many requests", 429),
    ErrorCode("PAGINATION_NUMBER_INVALID", "invalid number of results requested", 400),
    ErrorCode("RANGE_INVALID", "invalid content range", 416),
    ErrorCode("UNAVAILABLE", "service unavailable", 503),
    ErrorCode("UNKNOWN", "unknown error", 500),
]
CODES: Mapping[str, ErrorCode] = {c.code: c for c in _CODES}

#: Fallback code for an upstream status whose body carried no OCI error.
_STATUS_CODES = {
    400: "UNKNOWN",
    401: "UNAUTHORIZED",
    403: "DENIED",
    404: "NAME_UNKNOWN",
    405: "UNSUPPORTED",
    416: "RANGE_INVALID",
    429: "TOOMANYREQUESTS",
    503: "UNAVAILABLE",
}


class OCIError(Exception):
    """An error that reaches the client as OCI error JSON."""

    def __init__(
        self,
        code: str,
        message: str | None = None,
        *,
        status: int | None = None,
        detail: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        entry = CODES.get(code, CODES["UNKNOWN"])
        self.code = code if code in CODES else "UNKNOWN"
        self.message = message or entry.message
        self.status = status or entry.status
        self.detail = detail
        self.headers = dict(headers or {})
        super().__init__(f"{self.code}: {self.message}")

    def body(self) -> dict[str, Any]:
        item: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            item["detail"] = self.detail
        return {"errors": [item]}


def error_response(err: OCIError, *, head: bool = False) -> web.Response:
    """Render an OCIError as a response (no body for HEAD, as HTTP requires)."""
    headers = {"Docker-Distribution-API-Version": "registry/2.0", **err.headers}
    if head:
        return web.Response(status=err.status, headers=headers)
    return web.Response(
        status=err.status,
        body=json.dumps(err.body()).encode(),
        content_type="application/json",
        headers=headers,
    )


def error_from_upstream(status: int, body: bytes, default_code: str) -> OCIError:
    """Relay an upstream error as an OCIError, whether or not its body was OCI JSON.

    The relayed message is the upstream's own (truncated); nothing of our request, such as
    credentials, is echoed.
    """
    code = default_code if status == 404 else _STATUS_CODES.get(status, "UNKNOWN")
    message: str | None = None
    try:
        doc = json.loads(body)
        first = doc["errors"][0]
        if isinstance(first.get("code"), str) and first["code"] in CODES:
            code = first["code"]
        if isinstance(first.get("message"), str):
            message = first["message"][:500]
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, RecursionError):
        text = body[:300].decode("utf-8", "replace").strip()
        message = f"upstream answered {status}" + (f": {text}" if text else "")
    if status >= 500 and status != 503:
        # An upstream 5xx is our 502: the mirror itself is fine.
        return OCIError("UNKNOWN", message or f"upstream answered {status}", status=502)
    return OCIError(code, message, status=status if status in (401, 403, 404, 429) else None)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def is_client_disconnect(request: web.BaseRequest, exc: BaseException) -> bool:
    """Whether ``exc`` only says that the client went away (reset, closed, or timed out
    by the kernel's send timeout) rather than that something of ours failed: an OS-level
    error while the client's connection is gone or closing, or a reset/broken pipe/kernel
    timeout on it (sendfile reports those on the socket before the transport knows). Errors
    of our own upstream client (``aiohttp.ClientError``) never count."""
    if not isinstance(exc, OSError) or (isinstance(exc, aiohttp.ClientError) and not (
            request.transport is None or request.transport.is_closing())):
        return False
    transport = request.transport
    if transport is None or transport.is_closing():
        return True
    return isinstance(exc, ConnectionError) or exc.errno == errno.ETIMEDOUT


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render every error as OCI error JSON; never leak a traceback."""
    head = request.method == "HEAD"
    try:
        return await handler(request)
    except OCIError as err:
        return error_response(err, head=head)
    except web.HTTPMethodNotAllowed:
        return error_response(OCIError("UNSUPPORTED", f"method {request.method} not supported"),
                              head=head)
    except web.HTTPNotFound:
        return error_response(OCIError("NAME_UNKNOWN", "no such endpoint", status=404), head=head)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _STATUS_CODES.get(exc.status, "UNKNOWN")
        return error_response(OCIError(code, exc.reason, status=exc.status), head=head)
    except Exception as exc:
        if is_client_disconnect(request, exc):
            raise  # not an error of ours: the access log records it, once
        log.exception("request.unhandled_error", method=request.method, path=request.path)
        return error_response(OCIError("UNKNOWN", "internal error"), head=head)
