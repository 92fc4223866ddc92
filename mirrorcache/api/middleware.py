"""The access log: one ``request.finished`` event (and metrics) per request, after the body.

A client that goes away mid-response is not an error of ours: it is logged once as
``request.client_disconnected`` (no traceback), its ``request.finished`` carries
``error: client_disconnected`` and the body bytes really sent, and the connection is closed.
Requests of other replicas (the peer endpoint) are logged too, with ``route: peer``, but not
counted in the client request metrics (the peer endpoint has its own).
"""

from __future__ import annotations

import logging
import time

import structlog
from aiohttp import web

from mirrorcache.api.keys import (
    ABORTED_KEY,
    CACHE_KEY,
    KIND_KEY,
    RESPONSE_KEY,
    SENT_KEY,
    TARGET_KEY,
)
from mirrorcache.api.services import SERVICES
from mirrorcache.cluster.client import PREFIX as PEER_PREFIX
from mirrorcache.errors import Handler, is_client_disconnect, send_response
from mirrorcache.log import redact_query

log = structlog.get_logger("mirrorcache.access")


@web.middleware
async def access_log_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Send the response here, so the event carries the bytes really sent."""
    start = time.monotonic()
    resp: web.StreamResponse | None = None
    error: str | None = None
    try:
        resp = await handler(request)
        if not resp.prepared:
            resp = await send_response(request, resp)
        return resp
    except Exception as exc:
        if not is_client_disconnect(request, exc):
            error = type(exc).__name__
            raise
        error = "client_disconnected"
        log.info("request.client_disconnected", method=request.method, path=request.path[:512],
                 client=request.remote, error=type(exc).__name__,
                 bytes=request.get(SENT_KEY, 0))
        if request.transport is not None:
            request.transport.abort()  # a response cut short must never be reused
        if resp is None:
            resp = request.get(RESPONSE_KEY) or web.Response(status=499)
        resp.force_close()
        return resp  # aiohttp finds the connection gone and logs nothing more
    finally:
        if request.path.startswith("/v2"):
            _record(request, resp, start, error)
        elif request.path.startswith(PEER_PREFIX):
            # Logged (never the signature header) but not counted as client traffic.
            _record(request, resp, start, error, peer=True)


def _record(request: web.Request, resp: web.StreamResponse | None, start: float,
            error: str | None, *, peer: bool = False) -> None:
    status = resp.status if resp is not None else 499
    aborted = request.get(ABORTED_KEY, False)
    sent = _body_bytes(request, resp, error, aborted)
    cache = request.get(CACHE_KEY, "none")
    duration = time.monotonic() - start
    if log.is_enabled_for(logging.INFO):  # the fields are built only to be written
        target = request.get(TARGET_KEY)
        fields = {
            "method": request.method,
            "path": request.path[:512],
            "query": redact_query(request.query_string[:512]),
            "route": "peer" if peer else target.form if target else None,
            "upstream": target.upstream if target else None,
            "repository": target.repository if target else None,
            "status": status,
            "bytes": sent,
            "duration_ms": round(duration * 1000, 2),
            "cache": cache,
            "client": request.remote,
        }
        if error or aborted:
            fields["error"] = error or "aborted"
        log.info("request.finished", **fields)
    if peer:
        return
    request.app[SERVICES].metrics.request_finished(
        request.method, request.get(KIND_KEY, "other"), status, cache, duration, sent)


def _body_bytes(request: web.Request, resp: web.StreamResponse | None,
                error: str | None, aborted: bool) -> int:
    """Body bytes sent: the declared length when the response completed, else what was
    really handed to the kernel before it was cut."""
    if resp is None or request.method == "HEAD":
        return 0
    if error is None and resp.content_length is not None and not aborted:
        return resp.content_length
    return request.get(SENT_KEY) or resp.body_length
