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
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import aiohttp
import structlog

from mirrorcache.config import UpstreamConfig
from mirrorcache.errors import OCIError
from mirrorcache.metrics import Metrics
from mirrorcache.oci.reference import Digest
from mirrorcache.proxy.routing import Target
from mirrorcache.proxy.upstreams import Upstreams, relay_error
from mirrorcache.proxy.visibility import RepositoryGate
from mirrorcache.storage.base import (
    BlobStore,
    BlobWriter,
    DigestMismatch,
    FetchClaim,
    FetchClaims,
    StorageError,
    blob_claim_key,
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


class CacheWriteFailed(DownloadFailed):
    """Storage failed under an in-flight download: its readers continue straight from
    upstream (:meth:`BlobService.remainder`) instead of being cut."""


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
        if isinstance(self.error, _StorageFailed):
            raise CacheWriteFailed(self.error.code, self.error.message, status=self.error.status)
        raise DownloadFailed("BLOB_UNKNOWN", "in-flight blob vanished", status=500)

    async def available(self, pos: int, stop: int) -> int:
        """Wait until bytes past ``pos`` (up to ``stop``) may be sent; return how far.
        Raises DownloadFailed if the download fails first."""
        while True:
            changed = self._changed
            if isinstance(self.error, _StorageFailed):
                raise CacheWriteFailed(self.error.code, self.error.message,
                                       status=self.error.status)
            if self.error is not None:
                raise DownloadFailed(self.error.code, self.error.message,
                                     status=self.error.status)
            limit = min(self.readable_until(), stop)
            if pos < limit or (self.done and pos >= stop):
                return limit
            if self.done:
                raise DownloadFailed("UNKNOWN", "in-flight blob shorter than announced")
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
    joined: bool
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
                 gate: RepositoryGate | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 claims: FetchClaims | None = None) -> None:
        self._upstreams = upstreams
        #: Cross-process single-flight, when the store offers it; else per process only.
        self._claims = claims
        self._clock = clock  # for the storage-bypass window
        self._configs = configs
        self._store = store
        self._meta = meta
        self._metrics = metrics
        self._gate = gate or RepositoryGate(configs, meta)
        self._downloads: dict[Digest, Download] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._bypass_until = 0.0
        self._storage_error: str | None = None

    def storage_problem(self) -> str | None:
        """Why blobs bypass the cache right now (storage failing), or None."""
        if self._clock() < self._bypass_until:
            return f"storage failing, serving uncached: {self._storage_error}"
        return None

    @property
    def inflight(self) -> int:
        return len(self._downloads)

    def read(self, digest: Digest, offset: int = 0, length: int | None = None
             ) -> AsyncIterator[bytes]:
        """A committed blob's bytes from the store (for blobs not on local disk)."""
        return self._store.reader(digest, offset, length)

    async def _cached(self, target: Target, digest: Digest) -> CachedBlob | None:
        try:
            info = await self._store.stat(digest)
        except StorageError:
            return None
        if info is None:
            return None
        dl = self._downloads.get(digest)
        await self._admit(target, digest, dl.target if dl is not None else None, info.size)
        await self._meta.touch(digest)
        return CachedBlob(digest, info.size, self._store.local_path(digest))

    async def _admit(self, target: Target, digest: Digest, fetching_for: Target | None,
                     size: int | None = None) -> None:
        """The one repository rule (see visibility.py), for blobs."""

        async def confirm() -> int | None:
            return (await self._head_upstream(target, digest)).size

        owner = (fetching_for.upstream, fetching_for.repository) if fetching_for else None
        await self._gate.admit(target, digest, unknown="BLOB_UNKNOWN", confirm=confirm,
                               fetching_for=owner, size=size)

    async def head(self, target: Target, digest: Digest) -> CachedBlob | RemoteBlobInfo:
        cached = await self._cached(target, digest)
        if cached is not None:
            return cached
        dl = self._downloads.get(digest)
        if dl is not None and dl.size is not None:
            await self._admit(target, digest, dl.target, dl.size)
            return RemoteBlobInfo(digest, dl.size, "miss")
        if self._configs[target.upstream].offline:
            raise OCIError("BLOB_UNKNOWN", f"{digest} is not cached and upstream "
                           f"{target.upstream} is offline")
        return await self._head_upstream(target, digest)

    async def _head_upstream(self, target: Target, digest: Digest) -> RemoteBlobInfo:
        client = self._upstreams[target.upstream]
        async with client.open("HEAD", f"/v2/{target.repository}/blobs/{digest}",
                               target.repository) as resp:
            if resp.status != 200:
                raise await relay_error(resp, "BLOB_UNKNOWN")
            return RemoteBlobInfo(digest, resp.content_length)

    async def open(self, target: Target, digest: Digest,
                   range_header: str | None = None) -> BlobSource:
        """Where to read a blob from: the cache, an in-flight download, or upstream directly."""
        cached = await self._cached(target, digest)
        if cached is not None:
            return cached
        if self._configs[target.upstream].offline:
            raise OCIError("BLOB_UNKNOWN", f"{digest} is not cached and upstream "
                           f"{target.upstream} is offline")
        if self._clock() < self._bypass_until:
            return await self._passthrough(target, digest, range_header)
        dl = self._downloads.get(digest)
        joined = dl is not None
        if dl is None:
            dl = self._start(target, digest)
        else:
            # Joining another request's fetch obeys the same rule as the cache.
            await self._admit(target, digest, dl.target)
            self._metrics.coalesced.labels("blob").inc()
        await dl.started.wait()
        if dl.error is not None and dl.written == 0:
            if isinstance(dl.error, _StorageFailed):
                return await self._passthrough(target, digest, range_header)
            raise dl.error
        if dl.size is None:
            # No length from upstream: wait for the verified blob, then serve it from cache.
            await dl.finished.wait()
            if isinstance(dl.error, _StorageFailed):
                return await self._passthrough(target, digest, range_header)
            if dl.error is not None:
                raise dl.error
            return CachedBlob(digest, dl.written, self._store.local_path(digest), "miss")
        return InflightBlob(dl, joined)

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
                    claim: FetchClaim | None = (
                        self._claims.claim(blob_claim_key(digest)) if self._claims is not None
                        else _LocalClaim())
                except StorageError as exc:
                    self._storage_failed(exc)
                    raise _StorageFailed() from None
                if claim is not None:
                    try:
                        info = await self._store.stat(digest)
                    except StorageError:
                        claim.release(done=False)
                        raise
                    if info is not None:  # a peer committed it between our look and claim
                        claim.release(done=True)
                        await self._adopt_committed(dl, info.size, None)
                        return
                    await self._download(dl, claim)
                    return
                if not await self._follow_peer(dl):
                    return
        except StorageError as exc:
            self._storage_failed(exc)
            dl.error = _StorageFailed()
        except OCIError as exc:
            dl.error = exc
            log.warning("blob.fetch_failed", upstream=dl.target.upstream,
                        repository=dl.target.repository, digest=str(digest), error=exc.code,
                        message=exc.message, bytes=dl.written)
        except asyncio.CancelledError:
            dl.error = OCIError("UNAVAILABLE", "mirror shutting down", status=503)
            raise
        except Exception as exc:
            dl.error = OCIError("UNKNOWN", "blob fetch failed", status=500)
            log.exception("blob.fetch_crashed", digest=str(digest), error=type(exc).__name__)
        finally:
            if self._downloads.get(digest) is dl:
                del self._downloads[digest]
            dl.started.set()
            dl.finished.set()
            dl.notify()

    async def _adopt_committed(self, dl: Download, size: int,
                               fetched_for: Target | None) -> None:
        """Serve a blob another process committed: only once ``dl.target`` may see it."""
        await self._admit(dl.target, dl.digest, fetched_for, size)
        dl.path = dl.final_path
        dl.size = dl.written = size
        dl.done = True

    async def _follow_peer(self, dl: Download) -> bool:
        """Tail another process's fetch. Returns True when this process should take over."""
        self._metrics.coalesced.labels("blob_peer").inc()
        log.info("blob.following_peer", digest=str(dl.digest))
        loop = asyncio.get_running_loop()
        idle_limit = self._configs[dl.target.upstream].read_timeout + PEER_GRACE
        last_progress = loop.time()
        owner: Target | None = None
        while True:
            info = await self._store.stat(dl.digest)
            if info is not None:
                await self._adopt_committed(dl, info.size, owner)
                return False
            assert self._claims is not None  # only claims make a peer to follow
            peer = self._claims.peer_fetch(blob_claim_key(dl.digest))
            if peer.owner is not None and owner is None:
                up, _, repo = peer.owner.partition("/")
                owner = Target(up, repo)
            if not peer.alive:
                if await self._store.stat(dl.digest) is not None:
                    continue
                if peer.error is not None:
                    raise OCIError(str(peer.error.get("code", "UNKNOWN")),
                                   str(peer.error.get("message", "peer fetch failed")),
                                   status=int(peer.error.get("status", 502)))
                if dl.written == 0:
                    log.warning("blob.peer_vanished", digest=str(dl.digest))
                    return True
                raise OCIError("UNAVAILABLE", "peer fetch died mid-stream", status=503)
            if peer.path is not None and dl.path is None:
                # The peer fetches for its own repository: ours must be allowed to see it.
                await self._admit(dl.target, dl.digest, owner)
                dl.path, dl.size = peer.path, peer.size
                dl.started.set()
            if dl.path is not None:
                try:
                    written = os.stat(dl.path).st_size
                except OSError:
                    written = dl.written
                if written != dl.written:
                    dl.written = written
                    last_progress = loop.time()
                    dl.notify()
            if loop.time() - last_progress > idle_limit:
                raise OCIError("UNAVAILABLE", "peer fetch made no progress", status=503)
            await asyncio.sleep(PEER_POLL)

    async def _download(self, dl: Download, claim: FetchClaim) -> None:
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
                        raise await relay_error(resp, "BLOB_UNKNOWN")
                    dl.size = resp.content_length
                    claim.publish(w.local_path, dl.size, str(target))
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
                # Linked before the blob becomes visible, so this repository's own requests
                # never need upstream to confirm it (upstream just served it for this one).
                await self._meta.link(target.upstream, target.repository, digest)
                try:
                    await w.commit()
                except DigestMismatch as exc:
                    log.error("blob.digest_mismatch", upstream=target.upstream,
                              repository=target.repository, expected=str(digest),
                              actual=exc.actual, size=exc.size)
                    raise OCIError("DIGEST_INVALID", f"upstream content does not match {digest}",
                                   status=502) from None
            except StorageError as exc:
                self._storage_failed(exc)
                raise _StorageFailed() from None
            finally:
                try:
                    await writer_cm.__aexit__(None, None, None)
                except StorageError as exc:  # cleaning up after a failure failed too
                    log.warning("storage.cleanup_failed", digest=str(digest), error=str(exc))
            dl.size = dl.written
            dl.done = True
            self._metrics.upstream_bytes.labels(target.upstream).inc(dl.written)
            log.info("blob.committed", upstream=target.upstream, repository=target.repository,
                     digest=str(digest), bytes=dl.written,
                     duration_ms=round((time.monotonic() - started) * 1000, 1))
        except OCIError as exc:
            with contextlib.suppress(StorageError):
                claim.fail({"code": exc.code, "message": exc.message, "status": exc.status})
            raise
        finally:
            claim.release(done=dl.done)

    def _storage_failed(self, exc: Exception) -> None:
        self._bypass_until = self._clock() + BYPASS_SECONDS
        self._storage_error = str(exc)
        log.error("storage.write_failed", error=str(exc), bypass_seconds=BYPASS_SECONDS)

    async def remainder(self, target: Target, digest: Digest, start: int, end: int
                        ) -> AsyncGenerator[bytes]:
        """Bytes ``start``..``end`` (exclusive) of a blob straight from upstream, uncached: how
        readers of a download whose cache write failed finish their response."""
        source = await self._passthrough(target, digest, f"bytes={start}-{end - 1}")
        skip = 0
        if source.status == 200:
            skip = start  # upstream ignored the range: drop what was already sent
        elif not (source.content_range or "").startswith(f"bytes {start}-"):
            await source.chunks.aclose()
            raise DownloadFailed("UNAVAILABLE", "upstream could not resume the blob",
                                 status=503)
        log.warning("blob.continued_uncached", upstream=target.upstream,
                    repository=target.repository, digest=str(digest), offset=start)
        want = end - start
        async with contextlib.aclosing(source.chunks) as chunks:
            async for chunk in chunks:
                if skip:
                    if len(chunk) <= skip:
                        skip -= len(chunk)
                        continue
                    chunk, skip = chunk[skip:], 0
                chunk = chunk[:want]
                want -= len(chunk)
                if chunk:
                    yield chunk
                if want <= 0:
                    return
        if want > 0:
            raise DownloadFailed("UNAVAILABLE", "upstream body ended early", status=503)

    async def _passthrough(self, target: Target, digest: Digest,
                           range_header: str | None) -> PassthroughBlob:
        client = self._upstreams[target.upstream]
        headers = {"Range": range_header} if range_header else {}
        cm = client.open("GET", f"/v2/{target.repository}/blobs/{digest}", target.repository,
                         headers)
        resp = await cm.__aenter__()
        if resp.status not in (200, 206):
            try:
                raise await relay_error(resp, "BLOB_UNKNOWN")
            finally:
                await cm.__aexit__(None, None, None)

        async def chunks() -> AsyncGenerator[bytes]:
            try:
                async for chunk in resp.content.iter_chunked(UPSTREAM_CHUNK):
                    yield chunk
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise DownloadFailed("UNAVAILABLE", f"upstream body broke: "
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


class _LocalClaim:
    """The claim of a process whose store has no FetchClaims: nobody else to tell."""

    def publish(self, spool: Path | None, size: int | None, owner: str | None = None) -> None:
        pass

    def fail(self, error: dict[str, Any]) -> None:
        pass

    def release(self, *, done: bool) -> None:
        pass


class _StorageFailed(OCIError):
    def __init__(self) -> None:
        super().__init__("UNAVAILABLE", "storage failed", status=503)
