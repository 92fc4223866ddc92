"""Blob responses not served by sendfile of a committed file, in the spirit of aiohttp's
``web_fileresponse.py``: :class:`InflightBlobResponse` (a blob still arriving, tailed from its
spool file) and :class:`StoredBlobResponse` (a committed blob not on local disk, read from the
store). Both take the Range from ``request.http_range`` and send the whole body in
``prepare``, which is idempotent: the handler prepares them (so a failure before the status
line is OCI error JSON) and the access-log middleware finds them prepared.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from typing import BinaryIO

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from mirrorcache.api.keys import RESPONSE_KEY
from mirrorcache.api.streaming import abort, count_sent, send_chunks
from mirrorcache.errors import ErrorCode, OCIError
from mirrorcache.proxy.blobs import CacheWriteFailed, Download, DownloadFailed
from mirrorcache.proxy.download import DirectSink

#: Bytes per read where the event loop cannot sendfile (uvloop).
FALLBACK_CHUNK = 1 << 18

#: ``(start, end)`` -> the rest of a blob straight from upstream, uncached.
Remainder = Callable[[int, int], AsyncGenerator[bytes]]


def byte_range(request: web.BaseRequest, size: int) -> tuple[int, int] | None:
    """(start, end-exclusive) of a single-range request, None for the whole body; a range
    that cannot be satisfied (or parsed) is 416, as aiohttp's FileResponse answers for
    committed blobs."""
    try:
        rng = request.http_range
    except ValueError:
        raise _not_satisfiable(size) from None
    start, stop = rng.start, rng.stop
    if start is None and stop is None:
        return None
    if start is None:
        start = 0
    if start < 0:  # a suffix: the last -start bytes
        start, end = max(size + start, 0), size
    else:
        end = size if stop is None else min(stop, size)
    if start >= size or start >= end:
        raise _not_satisfiable(size)
    return start, end


def _not_satisfiable(size: int) -> OCIError:
    return OCIError(ErrorCode.RANGE_INVALID, f"range not satisfiable for {size} bytes",
                    headers={"Content-Range": f"bytes */{size}"})


class _RangedBlobResponse(web.StreamResponse):
    """A blob of known size, answered 200 or 206 with the requested range."""

    def __init__(self, size: int, headers: Mapping[str, str], *, ranges: bool = True) -> None:
        super().__init__(status=200, headers=headers)
        self._size = size
        #: False: the request's Range is ignored (an If-Range that did not hold).
        self._ranges = ranges
        self._writer: AbstractStreamWriter | None = None

    def _apply_range(self, request: web.BaseRequest) -> tuple[int, int]:
        rng = byte_range(request, self._size) if self._ranges else None
        start, end = rng if rng is not None else (0, self._size)
        if rng is not None:
            self.set_status(206)
            self.headers["Content-Range"] = f"bytes {start}-{end - 1}/{self._size}"
        self.content_length = end - start
        return start, end

    async def _send_head(self, request: web.BaseRequest) -> None:
        """Send the status line and headers (the access log now reports this response)."""
        request[RESPONSE_KEY] = self
        self._writer = await super().prepare(request)


class InflightBlobResponse(_RangedBlobResponse):
    """A blob that is still arriving: each verified-safe stretch of the spool file goes out
    with ``sendfile`` (zero-copy) as soon as it has landed, or read in an executor where the
    event loop has no sendfile. If the cache write fails underneath, the rest comes straight
    from upstream (``remainder``); if the download fails, the connection is cut."""

    def __init__(self, download: Download, headers: Mapping[str, str],
                 remainder: Remainder, *, ranges: bool = True) -> None:
        assert download.size is not None
        super().__init__(download.size, headers, ranges=ranges)
        self._dl = download
        self._remainder = remainder

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self.prepared:
            return self._writer
        dl = self._dl
        start, end = self._apply_range(request)
        dl.reader_at(self, start)  # the spool's pages behind every reader may go
        try:
            return await self._send(request, start, end)
        finally:
            dl.reader_left(self)

    async def _send(self, request: web.BaseRequest, start: int, end: int
                    ) -> AbstractStreamWriter | None:
        dl = self._dl
        pos = start
        try:
            # Fail cleanly (OCI JSON, before the status line) if not even the first byte comes.
            limit = await dl.available(pos, end) if end > start else end
            f = dl.open_file()
        except CacheWriteFailed:
            await self._send_head(request)
            await self._finish_uncached(request, pos, end)
            return self._writer
        sink: DirectSink | None = None
        lend = True  # caught up (again) after sending on its own: client first
        with f:
            await self._send_head(request)
            try:
                while pos < end:
                    if pos >= limit:
                        if sink is None and lend and min(dl.readable_until(), end) <= pos:
                            lend = False  # caught up with all the loop has heard of
                            sink = self._lend(request, f, pos, end)
                        if sink is not None:
                            if sink.lent:
                                await dl.changed()
                            if (sink.lent and dl.error is None
                                    and not (dl.done or dl.verified)):
                                reached = sink.pos  # the thread sends: follow it
                                count_sent(request, reached - pos)
                                pos = limit = reached
                                dl.reader_at(self, pos)
                                continue
                            # The loan ended (here, or by the thread: a full or failed
                            # socket): where the thread got to, read under its lock.
                            pos = limit = self._take_back(request, sink, pos)
                            sink = None
                            continue
                        limit = await dl.available(pos, end)
                    await self._send_range(request, f, pos, limit - pos)
                    lend = True
                    pos = limit
                    dl.reader_at(self, pos)
            except CacheWriteFailed:
                if sink is not None:
                    pos = self._take_back(request, sink, pos)
                    sink = None
                await self._finish_uncached(request, pos, end)
                return self._writer
            except DownloadFailed as exc:
                abort(request, exc)
                return self._writer
            finally:
                if sink is not None:
                    self._take_back(request, sink, pos)
        await self.write_eof()
        return self._writer

    def _lend(self, request: web.BaseRequest, f: BinaryIO, pos: int, end: int
              ) -> DirectSink | None:
        """Lend this connection to the receiving thread (:class:`DirectSink`) when it is
        plain TCP on asyncio's own loop with nothing queued in the transport (the status
        line and headers went out with the first stretch); None otherwise."""
        transport = request.transport
        if (not self._dl.lendable()
                or not isinstance(asyncio.get_running_loop(), asyncio.SelectorEventLoop)  # uvloop
                or transport is None or transport.is_closing()
                or transport.get_extra_info("sslcontext") is not None
                or transport.get_write_buffer_size()):
            return None
        sock = transport.get_extra_info("socket")
        if (sock is None or sock.type != socket.SOCK_STREAM
                or sock.family not in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX)):
            return None
        try:
            dup = socket.socket(fileno=os.dup(sock.fileno()))
        except OSError:
            return None
        dup.setblocking(False)
        sink = DirectSink(dup, f.fileno(), pos, end)
        if not self._dl.lend(sink):
            dup.close()
            return None
        return sink

    @staticmethod
    def _take_back(request: web.BaseRequest, sink: DirectSink, pos: int) -> int:
        """End the loan (idempotent) and close the lent socket's duplicate; the position
        reached, counting what the thread sent."""
        reached = max(sink.end_loan(), pos)
        sink.sock.close()  # the thread touches it only while lent
        count_sent(request, reached - pos)
        return reached

    async def _finish_uncached(self, request: web.BaseRequest, pos: int, end: int) -> None:
        """Storage failed under the download: send the rest straight from upstream."""
        async with contextlib.aclosing(self._remainder(pos, end)) as rest:
            await send_chunks(request, self, rest)

    async def _send_range(self, request: web.BaseRequest, f: BinaryIO, offset: int,
                          count: int) -> None:
        """``sendfile`` where the event loop has it (asyncio on Linux), else read (in an
        executor) and write in bounded chunks (uvloop has no loop.sendfile)."""
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("client went away")
        loop = asyncio.get_running_loop()
        try:
            await loop.sendfile(transport, f, offset, count)
            count_sent(request, count)
            return
        except NotImplementedError:
            pass
        except BaseException:
            count_sent(request, max(f.tell() - offset, 0))
            raise
        end = offset + count
        while offset < end:
            data = await loop.run_in_executor(None, os.pread, f.fileno(),
                                              min(FALLBACK_CHUNK, end - offset), offset)
            if not data:
                raise DownloadFailed(ErrorCode.UNKNOWN, "short read of in-flight blob")
            await self.write(data)
            count_sent(request, len(data))
            offset += len(data)


class StoredBlobResponse(_RangedBlobResponse):
    """A committed blob the store keeps off local disk (no path to sendfile): streamed from
    ``read(offset, length)`` (BlobService.read, over the store's reader; OCIError on
    failure)."""

    def __init__(self, size: int, headers: Mapping[str, str],
                 read: Callable[[int, int], AsyncGenerator[bytes]], *,
                 ranges: bool = True) -> None:
        super().__init__(size, headers, ranges=ranges)
        self._read = read

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self.prepared:
            return self._writer
        start, end = self._apply_range(request)
        async with contextlib.aclosing(self._read(start, end - start)) as chunks:
            # The first chunk before the status line: a vanished blob or failing storage is
            # a clean OCI error; later, a failure cuts the response.
            first = await anext(chunks, b"")
            await self._send_head(request)
            await send_chunks(request, self, _prepend(first, chunks))
        return self._writer


async def _prepend(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    if first:
        yield first
    async for chunk in rest:
        yield chunk
