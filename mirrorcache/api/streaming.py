"""Streamed response bodies: the bytes really sent (for the access log), and cutting a
response short when it fails after its status line."""

from __future__ import annotations

from collections.abc import AsyncIterator

import structlog
from aiohttp import web

from mirrorcache.api.keys import ABORTED_KEY, SENT_KEY
from mirrorcache.errors import OCIError

log = structlog.get_logger("mirrorcache.api")



def count_sent(request: web.BaseRequest, n: int) -> None:
    request[SENT_KEY] = request.get(SENT_KEY, 0) + n


async def send_chunks(request: web.BaseRequest, resp: web.StreamResponse,
                      chunks: AsyncIterator[bytes]) -> web.StreamResponse:
    """Write a prepared response's body; a failure mid-body cuts the connection."""
    try:
        async for chunk in chunks:
            await resp.write(chunk)
            count_sent(request, len(chunk))
    except OCIError as exc:  # DownloadFailed, or an upstream refusing the rest of the body
        abort(request, exc)
        return resp
    await resp.write_eof()
    return resp


def abort(request: web.BaseRequest, exc: OCIError) -> None:
    """The status line is gone: the only honest signal left is a cut connection."""
    log.warning("request.aborted", path=request.path, error=exc.code, message=exc.message)
    request[ABORTED_KEY] = True
    if request.transport is not None:
        request.transport.abort()
