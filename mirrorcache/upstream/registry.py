"""One upstream registry as typed operations: the remote side of the pull-through proxy.

Modelled on Distribution's ``registry/proxy/proxyblobstore.go``, whose remote side is a blob
service (``Stat``, ``Open``): the proxy asks for blobs, manifests and listings and gets typed
answers, never HTTP responses. URL building, relaying upstream errors as ``OCIError``, bounded
body reads and the mapping of transport failures to typed errors all happen here, on top of
:class:`~mirrorcache.upstream.client.UpstreamClient` (auth, retries, breaker, deadlines,
connection slots).

Every body is owned by an ``async with`` block: the upstream response (and its connection
slot) is released when that block exits, on every path.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import cast

import aiohttp

from mirrorcache.errors import ErrorCode, OCIError, error_from_upstream
from mirrorcache.oci.media import MAX_MANIFEST_BYTES
from mirrorcache.oci.reference import Digest
from mirrorcache.upstream.body import (
    MAX_ERROR_BODY,
    MAX_LISTING_BYTES,
    BodyRefused,
    read_capped,
)
from mirrorcache.upstream.breaker import CircuitBreaker
from mirrorcache.upstream.client import UpstreamClient, UpstreamUnavailable

#: Longest wait for an error body; a non-blob error body is already within request_timeout.
ERROR_BODY_TIMEOUT = 10.0
#: What listings (tags/list, referrers) are asked for as.
LISTING_ACCEPT = "application/json, application/vnd.oci.image.index.v1+json"

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class UpstreamBodyBroken(OCIError):
    """The upstream body stopped before its end (connection cut, read timeout): the bytes
    already received are good, and the caller may resume from where it stands."""

    def __init__(self, upstream: str, reason: str) -> None:
        self.reason = reason
        super().__init__(ErrorCode.UNAVAILABLE, f"upstream body broke: {reason}", status=503)


class UpstreamRangeRefused(OCIError):
    """A partial answer whose ``Content-Range`` is missing or not the range asked for."""

    def __init__(self, upstream: str, detail: str) -> None:
        super().__init__(ErrorCode.UNAVAILABLE,
                         f"upstream {upstream} answered a range badly: {detail}",
                         status=503)


@dataclass(frozen=True, slots=True)
class RemoteBlob:
    """What upstream says of a blob (``size`` None if it sent no length)."""

    digest: Digest
    size: int | None


class BlobBody:
    """An upstream blob body being received, from byte ``start``.

    ``size`` is the blob's total size (None if unknown), ``length`` the bytes this body
    carries (None if unknown), ``partial`` whether it is a range rather than the whole blob.
    A range asked for and answered in full (``partial`` False, ``start`` 0) is the caller's
    to skip into.
    """

    def __init__(self, upstream: str, digest: Digest, resp: aiohttp.ClientResponse, *,
                 size: int | None, start: int, length: int | None, partial: bool,
                 read_timeout: float | None = None) -> None:
        self.upstream = upstream
        self.digest = digest
        self.size = size
        self.start = start
        self.length = length
        self.partial = partial
        self._resp = resp
        self._read_timeout = read_timeout
        self._raw: RawBody | None = None
        self._taken: asyncio.BaseTransport | None = None

    @property
    def content_range(self) -> str | None:
        """The ``Content-Range`` value describing this body, if it is a range."""
        if not self.partial or self.length is None:
            return None
        total = "*" if self.size is None else str(self.size)
        return f"bytes {self.start}-{self.start + self.length - 1}/{total}"

    async def chunks(self, chunk_size: int) -> AsyncGenerator[bytes]:
        """The body's bytes as they arrive; a transport failure is ``UpstreamBodyBroken``."""
        try:
            async for chunk in self._resp.content.iter_chunked(chunk_size):
                yield chunk
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamBodyBroken(self.upstream, type(exc).__name__) from None

    def raw(self) -> RawBody | None:
        """The rest of the body as a blocking reader for a thread (:class:`RawBody`), taken
        off aiohttp's connection: the event loop then never touches the body's bytes (nor,
        over TLS, decrypts them: the thread takes over asyncio's TLS session). Only for an
        identity, ``Content-Length`` body on a loop transport that gives its socket, with a
        ``read_timeout``; None otherwise (no timeout, chunked, encoded, unknown length,
        uvloop's TLS), and the caller reads :meth:`chunks` as before. The connection is
        closed, not reused, when the body's block exits."""
        if self._raw is not None:
            return self._raw
        resp = self._resp
        if self._read_timeout is None:
            return None  # a thread's reads must time out: never a blocking, unbounded socket
        if self.length is None or resp.connection is None:
            return None
        if "chunked" in resp.headers.get("Transfer-Encoding", "").lower():
            return None
        if resp.headers.get("Content-Encoding", "identity").strip().lower() not in (
                "", "identity"):
            return None
        transport = resp.connection.transport
        if transport is None or transport.is_closing():
            return None
        tls = _TlsTakeover.of(transport)
        if tls is None and (transport.get_extra_info("sslcontext") is not None
                            or transport.get_extra_info("ssl_object") is not None):
            return None  # TLS of an SSL protocol we cannot take over (uvloop's)
        sock = transport.get_extra_info("socket")
        if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX):
            return None
        try:
            dup = socket.socket(fileno=os.dup(sock.fileno()))
        except OSError:
            return None
        try:
            # What aiohttp has parsed already comes first; then no more reads by the loop.
            head = resp.content.read_nowait(-1)
        except (RuntimeError, aiohttp.ClientError, TimeoutError):
            dup.close()
            return None
        transport.pause_reading()
        if tls is not None:
            tls.pause()
        dup.settimeout(self._read_timeout)  # non-blocking underneath, like the loop's socket
        self._raw = RawBody(self.upstream, dup, head, self.length, tls)
        self._taken = transport
        return self._raw

    def close(self) -> None:
        """Release the raw reader, if one was taken; the connection then cannot be reused."""
        if self._raw is not None:
            self._raw.close()
            if self._taken is not None:
                self._taken.abort()  # type: ignore[attr-defined]  # no TLS goodbye: never read
            self._resp.close()


class RawBody:
    """A blob body read straight from the upstream socket, blocking, in one thread: at most
    ``length`` bytes (bytes aiohttp had already buffered come first). Each read waits at
    most ``read_timeout``; a cut or a silent upstream is ``UpstreamBodyBroken``, and
    :meth:`abort` (from any thread) wakes a blocked read."""

    def __init__(self, upstream: str, sock: socket.socket, head: bytes, length: int,
                 tls: _TlsTakeover | None = None) -> None:
        self.upstream = upstream
        self._sock = sock
        self._head = memoryview(head)
        self.remaining = length
        self._aborted = False
        self._tls = tls
        self._cipher = memoryview(bytearray(1 << 18)) if tls is not None else None

    def recv_into(self, buf: memoryview) -> int:
        """Fill ``buf`` as far as the body goes; 0 at its end (``remaining`` 0). A body that
        stops short is ``UpstreamBodyBroken`` (after the bytes before are returned)."""
        want = min(len(buf), self.remaining)
        got = 0
        if self._head:
            got = min(len(self._head), want)
            buf[:got] = self._head[:got]
            self._head = self._head[got:]
        while got < want:
            if self._aborted:
                raise UpstreamBodyBroken(self.upstream, "aborted")
            try:
                n = (self._sock.recv_into(buf[got:want]) if self._tls is None
                     else self._recv_tls(buf, got, want))
            except TimeoutError:
                if got:
                    break  # hand over what came; the next read times out again
                raise UpstreamBodyBroken(self.upstream, "SocketTimeoutError") from None
            except OSError as exc:
                if got:
                    break
                raise UpstreamBodyBroken(self.upstream, type(exc).__name__) from None
            if n == 0:
                if got:
                    break
                raise UpstreamBodyBroken(self.upstream, "ClientPayloadError")
            got += n
        self.remaining -= got
        return got

    def _recv_tls(self, buf: memoryview, got: int, want: int) -> int:
        """Plaintext into ``buf[got:want]``, as much as the TLS session holds (a record per
        ``read``: this loop is the per-record cost, so it is kept tight), else ciphertext
        from the socket fed to it first. Returns the bytes added; 0 at the end of the
        stream."""
        tls = self._tls
        assert tls is not None and self._cipher is not None
        read = tls.read_into
        start = got
        while True:
            try:
                while got < want:
                    n = read(want - got, buf[got:])
                    if not n:
                        break
                    got += n
                return got - start
            except ssl.SSLWantReadError:
                if got > start:
                    return got - start
            except ssl.SSLZeroReturnError:  # close_notify
                return got - start
            except ssl.SSLError as exc:
                if got > start:
                    return got - start
                raise OSError(str(exc)) from None
            k = self._sock.recv_into(self._cipher)
            if k == 0:
                return 0
            tls.incoming.write(self._cipher[:k])

    def abort(self) -> None:
        """Wake a read blocked in another thread and end this body."""
        self._aborted = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self._sock.close()


#: ``SSLObject.read(len, buffer)``: with a buffer it returns a count.
_ReadInto = Callable[[int, memoryview], int]


class _TlsTakeover:
    """The TLS session of an asyncio ``SSLProtocol`` (CPython's), taken over by the thread
    that reads a blob body: its ``SSLObject`` and the ``MemoryBIO`` it decrypts from. Once the
    app side and the socket side are both paused, the event loop never touches either again
    (the connection is closed, not reused, after the body), so the thread may feed the BIO
    with ciphertext from the socket and read plaintext. These are private attributes of
    ``asyncio.sslproto``: anything unexpected, and the body stays on the event loop."""

    def __init__(self, proto: object, sslobj: ssl.SSLObject, incoming: ssl.MemoryBIO,
                 inner: asyncio.Transport) -> None:
        self._proto = proto
        self.sslobj = sslobj
        self.incoming = incoming
        self._inner = inner
        # ``read(n, buffer) -> count``, a record per call: the C method under ssl.py's
        # SSLObject.read wrapper where there is one (one Python frame less per record).
        self.read_into = cast(_ReadInto, getattr(getattr(sslobj, "_sslobj", None), "read",
                                                 sslobj.read))

    @classmethod
    def of(cls, transport: asyncio.BaseTransport) -> _TlsTakeover | None:
        proto = getattr(transport, "_ssl_protocol", None)
        sslobj = getattr(proto, "_sslobj", None)
        incoming = getattr(proto, "_incoming", None)
        inner = getattr(proto, "_transport", None)
        if (not isinstance(sslobj, ssl.SSLObject) or not isinstance(incoming, ssl.MemoryBIO)
                or not isinstance(inner, asyncio.Transport)
                or not hasattr(proto, "_ssl_reading_paused")):
            return None
        return cls(proto, sslobj, incoming, inner)

    def pause(self) -> None:
        """Stop the loop reading the socket, and keep the protocol's own flow control from
        resuming it (it resumes only what it paused itself)."""
        self._inner.pause_reading()
        self._proto._ssl_reading_paused = False  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class ManifestInfo:
    """Upstream's answer to a manifest HEAD: each field None when upstream did not say
    (or said something unparsable)."""

    digest: Digest | None
    media_type: str | None
    size: int | None


@dataclass(frozen=True, slots=True)
class Manifest:
    """A manifest as upstream sent it: ``digest`` from its Docker-Content-Digest header (not
    yet checked against ``body``), ``media_type`` from its Content-Type ("" if none)."""

    body: bytes
    digest: Digest | None
    media_type: str


@dataclass(frozen=True, slots=True)
class Listing:
    """A tag list or referrers index, relayed as upstream sent it."""

    body: bytes
    content_type: str
    link: str | None


async def relay_error(resp: aiohttp.ClientResponse, default_code: ErrorCode) -> OCIError:
    """Turn an upstream error response into an OCIError (reads at most ``MAX_ERROR_BODY``
    bytes, for at most ``ERROR_BODY_TIMEOUT``; a body that does not come is no body)."""
    try:
        async with asyncio.timeout(ERROR_BODY_TIMEOUT):
            body = await read_capped(resp, MAX_ERROR_BODY, "error body", truncate=True)
    except (aiohttp.ClientError, TimeoutError):
        body = b""
    err = error_from_upstream(resp.status, body, default_code)
    if resp.status in (502, 504):
        # A gateway in front of the upstream could not reach it (retries are spent): the
        # upstream is unavailable, as with 503. A 500 stays our 502: it is about the request.
        err = OCIError(ErrorCode.UNAVAILABLE, err.message, status=503)
    retry_after = resp.headers.get("Retry-After")
    if retry_after and resp.status in (429, 503):
        err.headers["Retry-After"] = retry_after
    return err


def _range_header(offset: int, end: int | None) -> str | None:
    if offset == 0 and end is None:
        return None
    return f"bytes={offset}-{'' if end is None else end - 1}"


class RegistryClient:
    """The typed registry operations of one upstream."""

    def __init__(self, http: UpstreamClient) -> None:
        self.http = http
        self.name = http.name

    @property
    def breaker(self) -> CircuitBreaker:
        return self.http.breaker

    # -- blobs
    async def stat_blob(self, repo: str, digest: Digest) -> RemoteBlob:
        """HEAD a blob in ``repo``; not there is the relayed 404 ``BLOB_UNKNOWN``."""
        async with self.http.open("HEAD", f"/v2/{repo}/blobs/{digest}", repo) as resp:
            if resp.status != 200:
                raise await relay_error(resp, ErrorCode.BLOB_UNKNOWN)
            return RemoteBlob(digest, resp.content_length)

    @asynccontextmanager
    async def open_blob(self, repo: str, digest: Digest, offset: int = 0,
                        end: int | None = None) -> AsyncIterator[BlobBody]:
        """GET a blob, from ``offset`` to ``end`` (exclusive; None: to its end). A partial
        answer is checked against the range asked for; a full answer to a range request is
        a body with ``start`` 0. The response is released when the block exits."""
        rng = _range_header(offset, end)
        async with self.http.open("GET", f"/v2/{repo}/blobs/{digest}", repo,
                                  {"Range": rng} if rng else None) as resp:
            if resp.status not in (200, 206):
                raise await relay_error(resp, ErrorCode.BLOB_UNKNOWN)
            read_timeout = self.http.cfg.read_timeout
            if resp.status == 200:
                body = BlobBody(self.name, digest, resp, size=resp.content_length, start=0,
                                length=resp.content_length, partial=False,
                                read_timeout=read_timeout)
                try:
                    yield body
                finally:
                    body.close()
                return
            value = resp.headers.get("Content-Range", "")
            m = _CONTENT_RANGE.fullmatch(value.strip())
            if m is None:
                raise UpstreamRangeRefused(self.name, f"Content-Range {value[:80]!r}")
            first, last = int(m.group(1)), int(m.group(2))
            if first != offset or last < first:
                raise UpstreamRangeRefused(self.name, f"asked for {rng}, got {value[:80]!r}")
            size = None if m.group(3) == "*" else int(m.group(3))
            body = BlobBody(self.name, digest, resp, size=size, start=first,
                            length=last - first + 1, partial=True, read_timeout=read_timeout)
            try:
                yield body
            finally:
                body.close()

    # -- manifests
    async def head_manifest(self, repo: str, reference: str, accept: str) -> ManifestInfo:
        async with self.http.open("HEAD", f"/v2/{repo}/manifests/{reference}", repo,
                                  {"Accept": accept}) as resp:
            if resp.status != 200:
                raise await relay_error(resp, ErrorCode.MANIFEST_UNKNOWN)
            header = resp.headers.get("Docker-Content-Digest")
            digest: Digest | None = None
            if header:
                try:
                    digest = Digest.parse(header)
                except OCIError:
                    digest = None
            return ManifestInfo(digest, resp.headers.get("Content-Type"), resp.content_length)

    async def get_manifest(self, repo: str, reference: str, accept: str) -> Manifest:
        """GET a manifest, read whole up to ``MAX_MANIFEST_BYTES`` (larger, or encoded:
        502 ``MANIFEST_INVALID``). A malformed digest header is ``DIGEST_INVALID``."""
        async with self.http.open("GET", f"/v2/{repo}/manifests/{reference}", repo,
                                  {"Accept": accept}) as resp:
            if resp.status != 200:
                raise await relay_error(resp, ErrorCode.MANIFEST_UNKNOWN)
            try:
                body = await read_capped(resp, MAX_MANIFEST_BYTES, "manifest")
            except BodyRefused as exc:
                raise OCIError(ErrorCode.MANIFEST_INVALID, f"upstream {exc}", status=502) from None
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise UpstreamUnavailable(self.name, type(exc).__name__) from None
            header = resp.headers.get("Docker-Content-Digest")
            content_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
        return Manifest(body, Digest.parse(header) if header else None, content_type)

    # -- listings
    async def list_tags(self, repo: str, params: Mapping[str, str]) -> Listing:
        """``tags/list``; an unknown repository is the relayed ``NAME_UNKNOWN``."""
        return await self._listing(repo, "tags/list", params, ErrorCode.NAME_UNKNOWN)

    async def referrers(self, repo: str, digest: Digest, params: Mapping[str, str]
                        ) -> Listing:
        return await self._listing(repo, f"referrers/{digest}", params, ErrorCode.MANIFEST_UNKNOWN)

    async def _listing(self, repo: str, suffix: str, params: Mapping[str, str],
                       default_code: ErrorCode) -> Listing:
        async with self.http.open("GET", f"/v2/{repo}/{suffix}", repo,
                                  {"Accept": LISTING_ACCEPT}, params) as resp:
            if resp.status != 200:
                raise await relay_error(resp, default_code)
            try:
                body = await read_capped(resp, MAX_LISTING_BYTES, "upstream listing")
            except BodyRefused as exc:
                raise OCIError(ErrorCode.UNKNOWN, f"upstream {exc}", status=502) from None
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise UpstreamUnavailable(self.name, type(exc).__name__) from None
            return Listing(body, resp.headers.get("Content-Type", "application/json"),
                           resp.headers.get("Link"))
