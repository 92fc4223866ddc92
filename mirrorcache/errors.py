"""The OCI error-code table and the one place that renders error responses.

Handlers and services raise :class:`OCIError`; :func:`error_middleware` turns it (and any
unexpected exception, without a traceback) into ``{"errors": [{"code", "message", "detail"}]}``.
"""

from __future__ import annotations

import errno
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import aiohttp
import structlog
from aiohttp import web

log = structlog.get_logger("mirrorcache.errors")


class ErrorCode(StrEnum):
    """Every error code we send (the distribution spec's): a typo is a type error."""

    BLOB_UNKNOWN = "BLOB_UNKNOWN"
    BLOB_UPLOAD_INVALID = "BLOB_UPLOAD_INVALID"
    BLOB_UPLOAD_UNKNOWN = "BLOB_UPLOAD_UNKNOWN"
    DIGEST_INVALID = "DIGEST_INVALID"
    MANIFEST_BLOB_UNKNOWN = "MANIFEST_BLOB_UNKNOWN"
    MANIFEST_INVALID = "MANIFEST_INVALID"
    MANIFEST_UNKNOWN = "MANIFEST_UNKNOWN"
    NAME_INVALID = "NAME_INVALID"
    NAME_UNKNOWN = "NAME_UNKNOWN"
    SIZE_INVALID = "SIZE_INVALID"
    TAG_INVALID = "TAG_INVALID"
    UNAUTHORIZED = "UNAUTHORIZED"
    DENIED = "DENIED"
    UNSUPPORTED = "UNSUPPORTED"
    TOOMANYREQUESTS = "TOOMANYREQUESTS"
    PAGINATION_NUMBER_INVALID = "PAGINATION_NUMBER_INVALID"
    RANGE_INVALID = "RANGE_INVALID"
    UNAVAILABLE = "UNAVAILABLE"
    UNKNOWN = "UNKNOWN"

    @classmethod
    def from_wire(cls, value: object) -> ErrorCode:
        """A code read back from elsewhere (another worker's claim file): ours, or UNKNOWN."""
        try:
            return cls(str(value))
        except ValueError:
            return cls.UNKNOWN


@dataclass(frozen=True, slots=True)
class ErrorSpec:
    """An error code's default message and HTTP status."""

    code: ErrorCode
    message: str
    status: int


_CODES = [
    ErrorSpec(ErrorCode.BLOB_UNKNOWN, "blob unknown to registry", 404),
    ErrorSpec(ErrorCode.BLOB_UPLOAD_INVALID, "blob upload invalid", 400),
    ErrorSpec(ErrorCode.BLOB_UPLOAD_UNKNOWN, "blob upload unknown to registry", 404),
    ErrorSpec(ErrorCode.DIGEST_INVALID, "provided digest did not match uploaded content", 400),
    ErrorSpec(ErrorCode.MANIFEST_BLOB_UNKNOWN, "manifest references a manifest or blob unknown",
              404),
    ErrorSpec(ErrorCode.MANIFEST_INVALID, "manifest invalid", 400),
    ErrorSpec(ErrorCode.MANIFEST_UNKNOWN, "manifest unknown to registry", 404),
    ErrorSpec(ErrorCode.NAME_INVALID, "invalid repository name", 400),
    ErrorSpec(ErrorCode.NAME_UNKNOWN, "repository name not known to registry", 404),
    ErrorSpec(ErrorCode.SIZE_INVALID, "provided length did not match content length", 400),
    ErrorSpec(ErrorCode.TAG_INVALID, "manifest tag did not match URI", 400),
    ErrorSpec(ErrorCode.UNAUTHORIZED, "authentication required", 401),
    ErrorSpec(ErrorCode.DENIED, "requested access to the resource is denied", 403),
    ErrorSpec(ErrorCode.UNSUPPORTED, "the operation is unsupported", 405),
    ErrorSpec(ErrorCode.TOOMANYREQUESTS, "too many requests", 429),
    ErrorSpec(ErrorCode.PAGINATION_NUMBER_INVALID, "invalid number of results requested", 400),
    ErrorSpec(ErrorCode.RANGE_INVALID, "invalid content range", 416),
    ErrorSpec(ErrorCode.UNAVAILABLE, "service unavailable", 503),
    ErrorSpec(ErrorCode.UNKNOWN, "unknown error", 500),
]
CODES: Mapping[ErrorCode, ErrorSpec] = {c.code: c for c in _CODES}

#: Fallback code for an upstream status whose body carried no OCI error.
_STATUS_CODES: Mapping[int, ErrorCode] = {
    400: ErrorCode.UNKNOWN,
    401: ErrorCode.UNAUTHORIZED,
    403: ErrorCode.DENIED,
    404: ErrorCode.NAME_UNKNOWN,
    405: ErrorCode.UNSUPPORTED,
    416: ErrorCode.RANGE_INVALID,
    429: ErrorCode.TOOMANYREQUESTS,
    503: ErrorCode.UNAVAILABLE,
}


class OCIError(Exception):
    """An error that reaches the client as OCI error JSON."""

    def __init__(
        self,
        code: ErrorCode,
        message: str | None = None,
        *,
        status: int | None = None,
        detail: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        # A code that is not ours (only possible around the type checker) is UNKNOWN.
        self.code = ErrorCode.from_wire(code)
        entry = CODES[self.code]
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


def error_from_upstream(status: int, body: bytes, default_code: ErrorCode) -> OCIError:
    """Relay an upstream error as an OCIError, whether or not its body was OCI JSON.

    The relayed message is the upstream's own (truncated); nothing of our request, such as
    credentials, is echoed.
    """
    code = default_code if status == 404 else _STATUS_CODES.get(status, ErrorCode.UNKNOWN)
    message: str | None = None
    try:
        doc = json.loads(body)
        first = doc["errors"][0]
        if isinstance(first.get("code"), str) and first["code"] in CODES:
            code = ErrorCode(first["code"])
        if isinstance(first.get("message"), str):
            message = first["message"][:500]
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, RecursionError):
        text = body[:300].decode("utf-8", "replace").strip()
        message = f"upstream answered {status}" + (f": {text}" if text else "")
    if status >= 500 and status != 503:
        # An upstream 5xx is our 502: the mirror itself is fine.
        return OCIError(ErrorCode.UNKNOWN, message or f"upstream answered {status}", status=502)
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
    try:
        return await handler(request)
    except Exception as exc:
        return render_exception(request, exc)


def render_exception(request: web.BaseRequest, exc: Exception) -> web.Response:
    """The OCI error response for ``exc``; a client disconnect is re-raised (not ours). A
    500 always logs an error event: it is our own failure, whatever raised it."""
    head = request.method == "HEAD"
    if isinstance(exc, OCIError):
        if exc.status == 500:
            log.error("request.server_error", method=request.method, path=request.path[:512],
                      code=exc.code, message=exc.message)
        return error_response(exc, head=head)
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return error_response(OCIError(ErrorCode.UNSUPPORTED,
                                       f"method {request.method} not supported"), head=head)
    if isinstance(exc, web.HTTPNotFound):
        return error_response(OCIError(ErrorCode.NAME_UNKNOWN, "no such endpoint", status=404),
                              head=head)
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            raise exc
        code = _STATUS_CODES.get(exc.status, ErrorCode.UNKNOWN)
        return error_response(OCIError(code, exc.reason, status=exc.status), head=head)
    if is_client_disconnect(request, exc):
        raise exc  # not an error of ours: the access log records it, once
    log.error("request.unhandled_error", method=request.method, path=request.path,
              exc_info=exc)
    return error_response(OCIError(ErrorCode.UNKNOWN, "internal error"), head=head)


async def send_response(request: web.BaseRequest, resp: web.StreamResponse
                        ) -> web.StreamResponse:
    """Send a handler's response (outside the error middleware: the access log sends it, to
    count the bytes). A response that fails before its status line went out (an in-flight
    blob whose download failed after the handler returned) is answered like any handler
    error, never with aiohttp's bare 500; the response sent is returned."""
    try:
        await resp.prepare(request)
    except Exception as exc:
        if resp.prepared:
            raise
        resp = render_exception(request, exc)
        await resp.prepare(request)
    await resp.write_eof()
    return resp
