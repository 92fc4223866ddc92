"""A bounded local disk tier in front of S3, behind the same blob store protocol.

S3 holds everything; the local tier (a filesystem store's layout under ``root``) holds the
most recently used blobs up to ``max_size`` bytes, so hits go out with sendfile
(``local_path``). A local miss streams from S3 with ranged GETs and fills the local tier in
the background (one fill per digest, verified like any write). Writes go to both: the S3
writer's spool lives in the tier's ``tmp/`` and becomes the local copy at commit.

The least recently used copies are evicted when the tier is over ``max_size``. Recency is
this process's: worker processes sharing a tier each keep their own order (a copy another
worker evicted is simply a miss again, refilled from S3).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from types import TracebackType

import structlog
from aiobotocore.session import AioSession

from mirrorcache.config import S3StorageConfig
from mirrorcache.oci.reference import Digest
from mirrorcache.storage import keys
from mirrorcache.storage.base import BlobInfo, StorageError
from mirrorcache.storage.fs import FilesystemBlobStore, FsBlobWriter
from mirrorcache.storage.s3 import S3BlobStore, S3BlobWriter

log = structlog.get_logger("mirrorcache.storage.tiered")


class _TierWriter:
    """What both tier writers pass straight to the writer they wrap."""

    def __init__(self, store: TieredBlobStore, inner: S3BlobWriter | FsBlobWriter) -> None:
        self._store = store
        self._wrapped = inner
        self.digest = inner.digest

    @property
    def size(self) -> int:
        return self._wrapped.size

    @property
    def local_path(self) -> Path | None:
        return self._wrapped.local_path

    async def write(self, chunk: bytes) -> None:
        await self._wrapped.write(chunk)

    async def flush(self) -> None:
        await self._wrapped.flush()

    async def cancel(self) -> None:
        await self._wrapped.cancel()

    @property
    def finished(self) -> bool:
        return self._wrapped.finished


class TieredBlobWriter(_TierWriter):
    """An S3 write whose verified spool file becomes the local copy at commit."""

    def __init__(self, store: TieredBlobStore, inner: S3BlobWriter) -> None:
        super().__init__(store, inner)
        self._inner = inner

    @property
    def upload_id(self) -> str | None:
        return self._inner.upload_id

    async def verify(self) -> None:
        await self._inner.verify()

    async def commit(self) -> BlobInfo:
        info = await self._inner.commit_keep_spool()
        spool = self._inner.local_path
        assert spool is not None
        self._store.adopt(spool, info)
        return info


class TieredLocalWriter(_TierWriter):
    """A write into the local tier alone, counted in its LRU at commit."""

    def __init__(self, store: TieredBlobStore, inner: FsBlobWriter) -> None:
        super().__init__(store, inner)
        self._inner = inner

    async def commit(self) -> BlobInfo:
        info = await self._inner.commit()
        if info.size > self._store.max_size:  # can never fit: S3 (the owner's) only
            with contextlib.suppress(FileNotFoundError):
                self._store.local.path_of(info.digest).unlink()
        else:
            self._store._note(info.digest, info.size)
        return info


class TieredBlobStore:
    """S3 behind a bounded, least-recently-used local disk tier (see the module docstring)."""

    def __init__(self, remote: S3BlobStore, root: Path, max_size: int) -> None:
        self.remote = remote
        self.local = FilesystemBlobStore(root)
        self.max_size = max_size
        self._lru: OrderedDict[Digest, int] = OrderedDict()
        self._used = 0
        self._fills: dict[Digest, asyncio.Task[None]] = {}

    async def __aenter__(self) -> TieredBlobStore:
        """Index what is already on local disk (oldest access first) and trim to size."""
        found: list[tuple[float, Digest, int]] = []
        async for info in self.local.list():
            path = self.local.path_of(info.digest)
            with contextlib.suppress(FileNotFoundError):
                found.append((path.stat().st_atime, info.digest, info.size))
        for _, digest, size in sorted(found, key=lambda f: f[0]):
            self._lru[digest] = size
            self._used += size
        self._evict()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        fills, self._fills = list(self._fills.values()), {}
        for task in fills:
            task.cancel()
        for task in fills:
            with contextlib.suppress(BaseException):
                await task

    @property
    def used(self) -> int:
        """Bytes held in the local tier (as this process counts them)."""
        return self._used

    def adopt(self, spool: Path, info: BlobInfo) -> None:
        """Move a verified file into the local tier (or drop it if it can never fit)."""
        final = self.local.path_of(info.digest)
        try:
            if info.size > self.max_size:
                spool.unlink()
                return
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(spool, final)
        except OSError as exc:
            with contextlib.suppress(OSError):
                spool.unlink()
            log.warning("storage.tier_adopt_failed", digest=str(info.digest),
                        reason=exc.strerror)
            return
        self._note(info.digest, info.size)

    def _note(self, digest: Digest, size: int) -> None:
        old = self._lru.pop(digest, None)
        if old is not None:
            self._used -= old
        self._lru[digest] = size
        self._used += size
        self._evict()

    def _evict(self) -> None:
        while self._used > self.max_size and self._lru:
            digest, size = self._lru.popitem(last=False)
            self._used -= size
            with contextlib.suppress(FileNotFoundError):
                self.local.path_of(digest).unlink()
            log.info("storage.tier_evicted", digest=str(digest), bytes=size)

    def local_path(self, digest: Digest) -> Path | None:
        path = self.local.path_of(digest)
        if not path.exists():
            if digest in self._lru:  # removed by another worker sharing the tier
                self._used -= self._lru.pop(digest)
            return None
        if digest in self._lru:
            self._lru.move_to_end(digest)
        else:
            with contextlib.suppress(OSError):
                self._note(digest, path.stat().st_size)
        return path

    async def stat(self, digest: Digest) -> BlobInfo | None:
        path = self.local_path(digest)
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                return BlobInfo(digest, path.stat().st_size)
        return await self.remote.stat(digest)

    async def reader(self, digest: Digest, offset: int = 0, length: int | None = None
                     ) -> AsyncIterator[bytes]:
        """From the local tier when there; otherwise ranged GETs from S3 while a background
        fill brings the blob into the tier. Raises BlobNotFound."""
        if self.local_path(digest) is not None:
            try:
                async for chunk in self.local.reader(digest, offset, length):
                    yield chunk
                return
            except StorageError:
                pass  # evicted under us: S3 has it
        first = True
        async for chunk in self.remote.reader(digest, offset, length):
            if first:
                first = False
                self.fill(digest)
            yield chunk
        if first:
            self.fill(digest)  # an empty range: the blob exists all the same

    def fill(self, digest: Digest) -> asyncio.Task[None]:
        """Copy a blob from S3 into the local tier in the background (once per digest)."""
        task = self._fills.get(digest)
        if task is None:
            task = asyncio.create_task(self._fill(digest))
            self._fills[digest] = task
            task.add_done_callback(lambda _t: self._fills.pop(digest, None))
        return task

    async def _fill(self, digest: Digest) -> None:
        try:
            info = await self.remote.stat(digest)
            if info is None or info.size > self.max_size or self.local.path_of(digest).exists():
                return
            async with self.local.writer(digest) as w:
                async for chunk in self.remote.reader(digest):
                    await w.write(chunk)
                committed = await w.commit()
            self._note(digest, committed.size)
            log.info("storage.tier_filled", digest=str(digest), bytes=committed.size)
        except StorageError as exc:
            log.warning("storage.tier_fill_failed", digest=str(digest), reason=str(exc))

    async def wait_fills(self) -> None:
        """Wait for the background fills in progress (tests, shutdown)."""
        while self._fills:
            await asyncio.gather(*self._fills.values(), return_exceptions=True)

    @asynccontextmanager
    async def writer(self, digest: Digest) -> AsyncIterator[TieredBlobWriter]:
        async with self.remote.writer(digest) as inner:
            yield TieredBlobWriter(self, inner)

    @asynccontextmanager
    async def local_writer(self, digest: Digest) -> AsyncIterator[TieredLocalWriter]:
        """A write into the local tier only (LocalTier capability): a replica teeing the
        owning replica's stream, which publishes the blob in S3 itself."""
        async with self.local.writer(digest) as inner:
            yield TieredLocalWriter(self, inner)

    async def publish_local(self, digest: Digest) -> bool:
        """Upload the local tier's copy to S3 unless S3 has it (the owner died before
        publishing it); the upload is verified again before it completes."""
        if await self.remote.stat(digest) is not None:
            return False
        async with self.remote.writer(digest) as w:
            async for chunk in self.local.reader(digest):
                await w.write(chunk)
            await w.commit()
        log.info("storage.tier_published", digest=str(digest), bytes=w.size)
        return True

    async def delete(self, digest: Digest) -> None:
        size = self._lru.pop(digest, None)
        if size is not None:
            self._used -= size
        await self.local.delete(digest)
        await self.remote.delete(digest)

    def list(self) -> AsyncIterator[BlobInfo]:
        return self.remote.list()

    async def presigned_url(self, digest: Digest, expires: float) -> str:
        return await self.remote.presigned_url(digest, expires)

    async def check(self) -> None:
        await self.remote.check()


@asynccontextmanager
async def open_s3_store(cfg: S3StorageConfig, spool_dir: Path,
                        session: AioSession | None = None
                        ) -> AsyncIterator[S3BlobStore | TieredBlobStore]:
    """The S3 store ``cfg`` describes: with ``local_cache``, the tiered store (spooling into
    the tier's ``tmp/``); without, plain S3 spooling into ``spool_dir``."""
    async with AsyncExitStack() as stack:
        local = cfg.local_cache
        spool = local.path / keys.TMP_DIR if local is not None else spool_dir
        remote = await stack.enter_async_context(S3BlobStore(cfg, spool, session))
        if local is None:
            yield remote
            return
        yield await stack.enter_async_context(TieredBlobStore(remote, local.path,
                                                              local.max_size))

