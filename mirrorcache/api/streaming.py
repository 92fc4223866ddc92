"""Streamed response bodies: the bytes really sent (for the access log), and cutting a
response short when it fails after its status line."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator

import structlog
from aiohttp import web

from mirrorcache.api.keys import ABORTED_KEY, SENT_KEY
from mirrorcache.errors import OCIError

log = structlog.get_logger("mirrorcache.api")

#: Linux's "send only full segments" (nginx's ``tcp_nopush``); None elsewhere.
TCP_CORK: int | None = getattr(socket, "TCP_CORK", None)


def _set_cork(transport: asyncio.BaseTransport | None, on: bool) -> None:
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or TCP_CORK is None:
        return
    with contextlib.suppress(OSError):  # not TCP (a Unix socket), or already closed
        sock.setsockopt(socket.IPPROTO_TCP, TCP_CORK, int(on))


@contextlib.contextmanager
def corked(transport: asyncio.BaseTransport | None) -> Iterator[None]:
    """Full-size TCP segments only while a body goes out by ``sendfile``; the last partial
    one is pushed when it ends, on any exit.

    ``sendfile`` hands the socket 64 KiB at a time (the kernel's pipe between file and
    socket), where a loopback segment holds 65483 bytes: with ``TCP_NODELAY`` (aiohttp's
    default) each ACK that opens the window lets the partial tail go out on its own.
    Measured (``ss -ti``, 1 GiB to bench/fetch.py): 30k data segments of 36 KB on average
    and 14k ACKs uncorked, 16.4k full ones and 8k ACKs corked, each segment processed in
    softirq at both ends. Corked, the headers also leave in the body's first segment. nginx
    does the same (``tcp_nopush on`` with ``sendfile``). Not for the written lead of
    ``BlobFileResponse``: corked, it no longer lets skopeo's receive buffer grow.
    """
    _set_cork(transport, True)
    try:
        yield
    finally:
        _set_cork(transport, False)


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
