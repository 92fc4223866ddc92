"""Pull-through blobs: one upstream fetch per digest, tailed by every client that wants it.

:class:`BlobService` answers from the cache, else joins the in-flight :class:`Download` of the
digest (download.py), else starts one, which another worker process may already be doing
(peer.py). Clients, the first one included, read the growing local file from any offset.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncGenerator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path

import structlog

from mirrorcache.config import UpstreamConfig
from mirrorcache.errors import ErrorCode, OCIError
from mirrorcache.metrics import Metrics
from mirrorcache.oci.reference import Digest
from mirrorcache.proxy.download import (
    BYPASS_SECONDS,
    MAX_RESUMES,
    UPSTREAM_CHUNK,
    CacheWriteFailed,
    Download,
    DownloadFailed,
    _StorageFailed,
)
from mirrorcache.proxy.owners import Owners
from mirrorcache.proxy.peer import PEER_GRACE, PEER_POLL, PeerFollowing
from mirrorcache.proxy.routing import Target
from mirrorcache.proxy.upstreams import Upstreams
from mirrorcache.proxy.visibility import RepositoryGate
from mirrorcache.storage.base import BlobNotFound, BlobStore, FetchClaims, StorageError
from mirrorcache.storage.metadata import MetadataStore
from mirrorcache.upstream.registry import BlobBody

log = structlog.get_logger("mirrorcache.blobs")

__all__ = [
    "BYPASS_SECONDS", "MAX_RESUMES", "PEER_GRACE", "PEER_POLL", "UPSTREAM_CHUNK",
    "BlobService", "BlobSource", "CacheWriteFailed", "CachedBlob", "Download",
    "DownloadFailed", "InflightBlob", "PassthroughBlob", "RemoteBlobInfo",
]


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
    """Storage is failing: the body comes straight from upstream, uncached.

    ``body`` is not open yet: whoever serves it enters it with ``async with`` before sending
    anything, so the upstream response (and its connection slot) is released on every path,
    a client gone before the response starts included. Upstream's refusals (404, ...) are
    raised on entry. Read it with ``body.chunks(UPSTREAM_CHUNK)``.
    """

    digest: Digest
    body: AbstractAsyncContextManager[BlobBody]
    cache: str = "bypass"


@dataclass(frozen=True, slots=True)
class RemoteBlobInfo:
    """What an upstream HEAD said of a blob we do not have."""

    digest: Digest
    size: int | None
    cache: str = "relay"


BlobSource = CachedBlob | InflightBlob | PassthroughBlob


class BlobService(PeerFollowing):
    """Answers blob requests from the cache, fetching each missing digest once."""

    def __init__(self, upstreams: Upstreams, configs: dict[str, UpstreamConfig],
                 store: BlobStore, meta: MetadataStore, metrics: Metrics,
                 gate: RepositoryGate | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 claims: FetchClaims | None = None, owners: Owners | None = None,
                 drop_behind: bool = True) -> None:
        self._upstreams = upstreams
        self._drop_behind = drop_behind  # see Download.drop_behind
        #: Other replicas owning digests (a cluster), asked before upstream; None: alone.
        self._owners = owners
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

    async def read(self, digest: Digest, offset: int = 0, length: int | None = None
                   ) -> AsyncGenerator[bytes]:
        """A committed blob's bytes from the store (for blobs not on local disk). Raises
        OCIError: BLOB_UNKNOWN if it vanished, UNAVAILABLE if storage fails."""
        try:
            async for chunk in self._store.reader(digest, offset, length):
                yield chunk
        except BlobNotFound:
            raise OCIError(ErrorCode.BLOB_UNKNOWN, f"{digest} vanished from storage",
                           status=404) from None
        except StorageError as exc:
            raise OCIError(ErrorCode.UNAVAILABLE, f"storage failed: {exc}", status=503) from None

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
        await self._gate.admit(target, digest, unknown=ErrorCode.BLOB_UNKNOWN, confirm=confirm,
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
            raise OCIError(ErrorCode.BLOB_UNKNOWN, f"{digest} is not cached and upstream "
                           f"{target.upstream} is offline")
        return await self._head_upstream(target, digest)

    async def _head_upstream(self, target: Target, digest: Digest) -> RemoteBlobInfo:
        remote = await self._upstreams[target.upstream].stat_blob(target.repository, digest)
        return RemoteBlobInfo(digest, remote.size)

    async def open(self, target: Target, digest: Digest,
                   range_header: str | None = None, *, ask_owner: bool = True) -> BlobSource:
        """Where to read a blob from: the cache, an in-flight download, or upstream directly.
        A download of a digest another replica owns streams from that owner, unless
        ``ask_owner`` is False (the request comes from a peer: never forwarded again)."""
        cached = await self._cached(target, digest)
        if cached is not None:
            return cached
        if self._configs[target.upstream].offline:
            raise OCIError(ErrorCode.BLOB_UNKNOWN, f"{digest} is not cached and upstream "
                           f"{target.upstream} is offline")
        if self._clock() < self._bypass_until:
            return self._passthrough(target, digest, range_header)
        while True:
            dl = self._downloads.get(digest)
            joined = dl is not None
            if dl is None:
                dl = self._start(target, digest, ask_owner=ask_owner)
            else:
                # Joining another request's fetch obeys the same rule as the cache.
                await self._admit(target, digest, dl.target)
                self._metrics.coalesced.labels("blob").inc()
            await dl.started.wait()
            if dl.error is None or dl.written > 0:
                break
            if isinstance(dl.error, _StorageFailed):
                return self._passthrough(target, digest, range_header)
            if joined and not _same_repository(dl.target, target):
                # Another repository's fetch failed (it may not hold the blob, or may refuse
                # that client): not our answer; fetch for our own repository.
                continue
            raise dl.error
        if dl.done:
            # Committed while this request waited (to be admitted): the spool may be gone
            # (uploaded to object storage, moved into a tier); serve the stored blob.
            return CachedBlob(digest, dl.written, self._store.local_path(digest), "miss")
        if dl.size is None:
            # No length from upstream: wait for the verified blob, then serve it from cache.
            await dl.finished.wait()
            if isinstance(dl.error, _StorageFailed):
                return self._passthrough(target, digest, range_header)
            if dl.error is not None:
                raise dl.error
            return CachedBlob(digest, dl.written, self._store.local_path(digest), "miss")
        return InflightBlob(dl)

    def _start(self, target: Target, digest: Digest, *, ask_owner: bool = True) -> Download:
        dl = Download(target, digest, drop_behind=self._drop_behind)
        dl.final_path = self._store.local_path(digest)
        if ask_owner and self._owners is not None:
            dl.source = self._owners.blob_source(target, digest,
                                                 self._upstreams[target.upstream])
        self._downloads[digest] = dl
        task = asyncio.ensure_future(self._fetch_or_follow(dl))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return dl

    async def remainder(self, target: Target, digest: Digest, start: int, end: int
                        ) -> AsyncGenerator[bytes]:
        """Bytes ``start``..``end`` (exclusive) of a blob straight from upstream, uncached: how
        readers of a download whose cache write failed finish their response."""
        client = self._upstreams[target.upstream]
        want = end - start
        async with client.open_blob(target.repository, digest, start, end) as body:
            skip = start - body.start  # upstream ignored the range: drop what was sent
            log.warning("blob.continued_uncached", upstream=target.upstream,
                        repository=target.repository, digest=str(digest), offset=start)
            async with contextlib.aclosing(body.chunks(UPSTREAM_CHUNK)) as chunks:
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
            raise DownloadFailed(ErrorCode.UNAVAILABLE, "upstream body ended early", status=503)

    def _passthrough(self, target: Target, digest: Digest,
                     range_header: str | None) -> PassthroughBlob:
        offset, end = _single_range(range_header)
        body = self._upstreams[target.upstream].open_blob(target.repository, digest, offset,
                                                          end)
        return PassthroughBlob(digest, body)

    async def aclose(self) -> None:
        # Blobs already verified and served, still being published (an S3 upload): give
        # them a bounded while to land rather than abort the upload.
        publishing = [dl.finished.wait() for dl in self._downloads.values()
                      if dl.verified and not dl.done]
        if publishing:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PUBLISH_GRACE):
                    await asyncio.gather(*publishing)
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


#: At shutdown, how long verified blobs still being published may take to land.
PUBLISH_GRACE = 20.0

_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


def _same_repository(a: Target, b: Target) -> bool:
    return (a.upstream, a.repository) == (b.upstream, b.repository)


def _single_range(header: str | None) -> tuple[int, int | None]:
    """(offset, end-exclusive or None) of a ``bytes=a-b`` or ``bytes=a-`` request; any other
    form (suffix, several ranges, malformed) asks for the whole blob, as RFC 9110 allows."""
    m = _RANGE.fullmatch((header or "").strip())
    if m is None:
        return 0, None
    offset = int(m.group(1))
    if not m.group(2):
        return offset, None
    last = int(m.group(2))
    return (offset, last + 1) if last >= offset else (0, None)
