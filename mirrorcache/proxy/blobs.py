"""Pull-through blobs: one upstream fetch per digest, tailed by every client that wants it.

A miss starts a :class:`Download`, a task detached from the requesting client: it streams the
upstream body into a store writer (hashing on the way) and commits only a verified blob.
Clients, the first one included, read the growing local file from any offset. The last byte is
held back until the digest is verified, so no client ever receives a complete body whose
digest is wrong: a failed download ends every reader's response short.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import aiohttp
import structlog

from mirrorcache.config import UpstreamConfig
from mirrorcache.errors import ErrorCode, OCIError
from mirrorcache.metrics import Metrics
from mirrorcache.oci.reference import Digest
from mirrorcache.proxy.routing import Target
from mirrorcache.proxy.upstreams import Upstreams, relay_error
from mirrorcache.storage.base import (
    BlobStore,
    BlobWriter,
    DigestMismatch,
    InflightClaim,
    StorageError,
)
from mirrorcache.storage.metadata import Metadata
from mirrorcache.upstream.client import UpstreamUnavailable

log = structlog.get_logger("mirrorcache.blobs")

UPSTREAM_CHUNK = 1 << 20
#: After a storage failure, serve straight from upstream for this long before trying again.
BYPASS_SECONDS = 30.0
#: Range requests to resume one broken upstream body before giving up.
MAX_RESUMES = 3
#: How often a process tailing another process's fetch looks at its progress.
PEER_POLL = 0.02
#: Extra patience, beyond the upstream read timeout, before a silent peer fetch is given up.
PEER_GRACE = 5.0


class DownloadFailed(OCIError):
    """An upstream blob fetch failed after the response to some clients had begun."""


class Download:
    """One in-flight upstream fetch of a blob, readable while it grows."""

    def __init__(self, target: Target, digest: Digest) -> None:
        self.target = target
        self.digest = digest
        self.size: int | None = None
        self.path: Path | None = None
        self.final_path: Path | None = None
        self.written = 0
        self.done = False
        self.error: OCIError | None = None
        self.started = asyncio.Event()
        self.finished = asyncio.Event()
        self._changed = asyncio.Event()

    def notify(self) -> None:
        ev, self._changed = self._changed, asyncio.Event()
        ev.set()

    def readable_until(self) -> int:
        """Bytes a reader may send now: all once verified, else all but the last."""
        if self.done:
            return self.written
        if self.size is None:
            return max(self.written - 1, 0)
        return min(self.written, self.size - 1)

    def open_file(self) -> BinaryIO:
        """The spool file (or, once committed, the blob), opened for reading; an open file
        stays valid when the spool is renamed into place."""
        for path in (self.path, self.final_path):
            if path is None:
                continue
            try:
                return open(path, "rb", buffering=0)  # the caller closes it
            except FileNotFoundError:
                continue
        raise DownloadFailed(ErrorCode.BLOB_UNKNOWN, "in-flight blob vanished", status=500)

    async def available(self, pos: int, stop: int) -> int:
        """Wait until bytes past ``pos`` (up to ``stop``) may be sent; return how far.
        Raises DownloadFailed if the download fails first."""
        while True:
            changed = self._changed
            if self.error is not None:
                raise DownloadFailed(self.error.code, self.error.message,
                                     status=self.error.status)
            limit = min(self.readable_until(), stop)
            if pos < limit or (self.done and pos >= stop):
                return limit
            if self.done:
                raise DownloadFailed(ErrorCode.UNKNOWN, "in-flight blob shorter than announced")
            await changed.wait()


@dataclass(frozen=True, slots=True)
class CachedBlob:
    """A committed blob; ``path`` is set when it is on local disk (served with sendfile)."""

    digest: Digest
    size: int
    path: Path | None
    cache: str = "hit"


@dataclass(frozen=True, slots=True)
class InflightBlob:
    """A blob being fetched: ``download.available()`` says how far its spool may be sent."""

    download: Download
    cache: str = "miss"


@dataclass(frozen=True, slots=True)
class PassthroughBlob:
    """Storage is failing: the body comes straight from upstream, uncached."""

    digest: Digest
    size: int | None
    status: int
    content_range: str | None
    chunks: AsyncGenerator[bytes]
    cache: str = "bypass"


@dataclass(frozen=True, slots=True)
class RemoteBlobInfo:
    """What an upstream HEAD said of a blob we do not have."""

    digest: Digest
    size: int | None
    cache: str = "relay"


BlobSource = CachedBlob | InflightBlob | PassthroughBlob


class BlobService:
    """Answers blob requests from the cache, fetching each missing digest once."""

    def __init__(self, upstreams: Upstreams, configs: dict[str, UpstreamConfig],
                 store: BlobStore, meta: Metadata, metrics: Metrics,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._upstreams = upstreams
        self._clock = clock  # for the storage-bypass window
        self._configs = configs
        self._store = store
        self._meta = meta
        self._metrics = metrics
        self._downloads: dict[Digest, Download] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._bypass_until = 0.0

    @property
    def inflight(self) -> int:
        return len(self._downloads)

    async def _cached(self, target: Target, digest: Digest) -> CachedBlob | None:
        try:
            info = await self._store.stat(digest)
        except StorageError:
            return None
        if info is None:
            return None
        cfg = self._configs[target.upstream]
        if not cfg.offline and not self._meta.is_linked(target.upstream, target.repository,
                                                        digest):
            # Stored for another repository: upstream must confirm this one holds it too.
            remote = await self._head_upstream(target, digest)
            if remote.size is not None and remote.size != info.size:
                raise OCIError(ErrorCode.BLOB_UNKNOWN, "upstream size differs from cached blob")
            await self._meta.link(target.upstream, target.repository, digest)
        await self._meta.touch(digest)
        return CachedBlob(digest, info.size, self._store.local_path(digest))

    async def head(self, target: Target, digest: Digest) -> CachedBlob | RemoteBlobInfo:
        cached = await self._cached(target, digest)
        if cached is not None:
            return cached
        dl = self._downloads.get(digest)
        if dl is not None and dl.size is not None:
            return RemoteBlobInfo(digest, dl.size, "miss")
        if self._configs[target.upstream].offline:
            raise OCIError(ErrorCode.BLOB_UNKNOWN, f"{digest} is not cached and upstream "
                           f"{target.upstream} is offline")
        return await self._head_upstream(target, digest)

    async def _head_upstream(self, target: Target, digest: Digest) -> RemoteBlobInfo:
        client = self._upstreams[target.upstream]
        async with client.open("HEAD", f"/v2/{target.repository}/blobs/{digest}",
                               target.repository) as resp:
            if resp.status != 200:
                raise await relay_error(resp, ErrorCode.BLOB_UNKNOWN)
            return RemoteBlobInfo(digest, resp.content_length)

    async def open(self, target: Target, digest: Digest,
                   range_header: str | None = None) -> BlobSource:
        """Where to read a blob from: the cache, an in-flight download, or upstream directly."""
        cached = await self._cached(target, digest)
        if cached is not None:
            return cached
        if self._configs[target.upstream].offline:
            raise OCIError(ErrorCode.BLOB_UNKNOWN, f"{digest} is not cached and upstream "
                           f"{target.upstream} is offline")
        if self._clock() < self._bypass_until:
            return await self._passthrough(target, digest, range_header)
        dl = self._downloads.get(digest)
        if dl is None:
            dl = self._start(target, digest)
        else:
            self._metrics.coalesced.labels("blob").inc()
        await dl.started.wait()
        if dl.error is not None and dl.written == 0:
            if isinstance(dl.error, _StorageFailed):
                return await self._passthrough(target, digest, range_header)
            raise dl.error
        if dl.size is None:
            # No length from upstream: wait for the verified blob, then serve it from cache.
            await dl.finished.wait()
            if dl.error is not None:
                raise dl.error
            return CachedBlob(digest, dl.written, self._store.local_path(digest), "miss")
        return InflightBlob(dl)

    def _start(self, target: Target, digest: Digest) -> Download:
        dl = Download(target, digest)
        dl.final_path = self._store.local_path(digest)
        self._downloads[digest] = dl
        task = asyncio.ensure_future(self._fetch_or_follow(dl))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return dl

    async def _fetch_or_follow(self, dl: Download) -> None:
        """Fetch the blob, unless another process on this host already is: then tail its
        spool file (and take over if it dies before sending a byte)."""
        digest = dl.digest
        try:
            while True:
                try:
                    claim = self._store.claim(digest)
                except StorageError as exc:
                    self._storage_failed(exc)
                    raise _StorageFailed() from None
                if claim is not None:
                    info = await self._store.stat(digest)
                    if info is not None:  # a peer committed it between our look and claim
                        claim.release(done=True)
                        await self._adopt_committed(dl, info.size)
                        return
                    await self._download(dl, claim)
                    return
                if not await self._follow_peer(dl):
                    return
        except OCIError as exc:
            dl.error = exc
            log.warning("blob.fetch_failed", upstream=dl.target.upstream,
                        repository=dl.target.repository, digest=str(digest), error=exc.code,
                        message=exc.message, bytes=dl.written)
        except asyncio.CancelledError:
            dl.error = OCIError(ErrorCode.UNAVAILABLE, "mirror shutting down", status=503)
            raise
        except Exception as exc:
            dl.error = OCIError(ErrorCode.UNKNOWN, "blob fetch failed", status=500)
            log.exception("blob.fetch_crashed", digest=str(digest), error=type(exc).__name__)
        finally:
            if self._downloads.get(digest) is dl:
                del self._downloads[digest]
            dl.started.set()
            dl.finished.set()
            dl.notify()

    async def _adopt_committed(self, dl: Download, size: int) -> None:
        dl.path = dl.final_path
        dl.size = dl.written = size
        dl.done = True
        await self._meta.link(dl.target.upstream, dl.target.repository, dl.digest)

    async def _follow_peer(self, dl: Download) -> bool:
        """Tail another process's fetch. Returns True when this process should take over."""
        self._metrics.coalesced.labels("blob_peer").inc()
        log.info("blob.following_peer", digest=str(dl.digest))
        loop = asyncio.get_running_loop()
        idle_limit = self._configs[dl.target.upstream].read_timeout + PEER_GRACE
        last_progress = loop.time()
        while True:
            info = await self._store.stat(dl.digest)
            if info is not None:
                await self._adopt_committed(dl, info.size)
                return False
            peer = self._store.peer_fetch(dl.digest)
            if not peer.alive:
                if await self._store.stat(dl.digest) is not None:
                    continue
                if peer.error is not None:
                    raise OCIError(ErrorCode.from_wire(peer.error.get("code")),
                                   str(peer.error.get("message", "peer fetch failed")),
                                   status=int(peer.error.get("status", 502)))
                if dl.written == 0:
                    log.warning("blob.peer_vanished", digest=str(dl.digest))
                    return True
                raise OCIError(ErrorCode.UNAVAILABLE, "peer fetch died mid-stream", status=503)
            if peer.path is not None and dl.path is None:
                dl.path, dl.size = peer.path, peer.size
                dl.started.set()
            if dl.path is not None:
                try:
                    written = os.stat(dl.path).st_size
                except FileNotFoundError:
                    written = dl.written
                if written != dl.written:
                    dl.written = written
                    last_progress = loop.time()
                    dl.notify()
            if loop.time() - last_progress > idle_limit:
                raise OCIError(ErrorCode.UNAVAILABLE, "peer fetch made no progress", status=503)
            await asyncio.sleep(PEER_POLL)

    async def _download(self, dl: Download, claim: InflightClaim) -> None:
        target, digest = dl.target, dl.digest
        client = self._upstreams[target.upstream]
        started = time.monotonic()
        try:
            try:
                writer_cm = self._store.writer(digest)
                w = await writer_cm.__aenter__()
            except StorageError as exc:
                self._storage_failed(exc)
                raise _StorageFailed() from None
            try:
                if w.local_path is None:
                    raise _StorageFailed()
                dl.path = w.local_path
                path = f"/v2/{target.repository}/blobs/{digest}"
                async with client.open("GET", path, target.repository) as resp:
                    if resp.status != 200:
                        raise await relay_error(resp, ErrorCode.BLOB_UNKNOWN)
                    dl.size = resp.content_length
                    claim.publish(w.local_path, dl.size)
                    dl.started.set()
                    log.info("blob.fetch_started", upstream=target.upstream,
                             repository=target.repository, digest=str(digest), size=dl.size)
                    broke = await _pump(resp, w, dl)
                resumes = 0
                while broke is not None and dl.size is not None and resumes < MAX_RESUMES:
                    resumes += 1
                    log.warning("blob.resume", upstream=target.upstream, digest=str(digest),
                                offset=w.size, size=dl.size, attempt=resumes, error=broke)
                    async with client.open("GET", path, target.repository,
                                           {"Range": f"bytes={w.size}-"}) as resp:
                        if resp.status != 206 or not _range_starts_at(resp, w.size):
                            raise UpstreamUnavailable(target.upstream, "could not resume "
                                                      f"after {w.size} bytes ({resp.status})")
                        broke = await _pump(resp, w, dl)
                if broke is not None:
                    raise UpstreamUnavailable(target.upstream, f"body broke after {w.size} "
                                              f"bytes: {broke}")
                if dl.size is not None and w.size != dl.size:
                    raise UpstreamUnavailable(target.upstream, f"body ended after {w.size} of "
                                              f"{dl.size} bytes")
                try:
                    await w.commit()
                except DigestMismatch as exc:
                    log.error("blob.digest_mismatch", upstream=target.upstream,
                              repository=target.repository, expected=str(digest),
                              actual=exc.actual, size=exc.size)
                    raise OCIError(ErrorCode.DIGEST_INVALID,
                                   f"upstream content does not match {digest}",
                                   status=502) from None
            except StorageError as exc:
                self._storage_failed(exc)
                raise _StorageFailed() from None
            finally:
                await writer_cm.__aexit__(None, None, None)
            await self._meta.link(target.upstream, target.repository, digest)
            dl.size = dl.written
            dl.done = True
            self._metrics.upstream_bytes.labels(target.upstream).inc(dl.written)
            log.info("blob.committed", upstream=target.upstream, repository=target.repository,
                     digest=str(digest), bytes=dl.written,
                     duration_ms=round((time.monotonic() - started) * 1000, 1))
        except OCIError as exc:
            with contextlib.suppress(OSError):
                claim.fail({"code": exc.code, "message": exc.message, "status": exc.status})
            raise
        finally:
            claim.release(done=dl.done)

    def _storage_failed(self, exc: Exception) -> None:
        self._bypass_until = self._clock() + BYPASS_SECONDS
        log.error("storage.write_failed", error=str(exc), bypass_seconds=BYPASS_SECONDS)

    async def _passthrough(self, target: Target, digest: Digest,
                           range_header: str | None) -> PassthroughBlob:
        client = self._upstreams[target.upstream]
        headers = {"Range": range_header} if range_header else {}
        cm = client.open("GET", f"/v2/{target.repository}/blobs/{digest}", target.repository,
                         headers)
        resp = await cm.__aenter__()
        if resp.status not in (200, 206):
            try:
                raise await relay_error(resp, ErrorCode.BLOB_UNKNOWN)
            finally:
                await cm.__aexit__(None, None, None)

        async def chunks() -> AsyncGenerator[bytes]:
            try:
                async for chunk in resp.content.iter_chunked(UPSTREAM_CHUNK):
                    yield chunk
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise DownloadFailed(ErrorCode.UNAVAILABLE, f"upstream body broke: "
                                     f"{type(exc).__name__}", status=503) from None
            finally:
                await cm.__aexit__(None, None, None)

        return PassthroughBlob(digest, resp.content_length, resp.status,
                               resp.headers.get("Content-Range"), chunks())

    async def aclose(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def _pump(resp: aiohttp.ClientResponse, w: BlobWriter, dl: Download) -> str | None:
    """Copy an upstream body into the writer; None when it ended, else why it broke."""
    broke: str | None = None
    try:
        async for chunk in resp.content.iter_chunked(UPSTREAM_CHUNK):
            await w.write(chunk)
            if w.size != dl.written:
                dl.written = w.size
                dl.notify()
    except (aiohttp.ClientError, TimeoutError) as exc:
        broke = type(exc).__name__
    await w.flush()
    dl.written = w.size
    dl.notify()
    if broke is None and dl.size is not None and w.size < dl.size:
        broke = "short body"
    return broke


def _range_starts_at(resp: aiohttp.ClientResponse, offset: int) -> bool:
    value = resp.headers.get("Content-Range", "")
    return value.startswith(f"bytes {offset}-")


class _StorageFailed(OCIError):
    def __init__(self) -> None:
        super().__init__(ErrorCode.UNAVAILABLE, "storage failed", status=503)
