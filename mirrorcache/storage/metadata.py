"""Metadata beside the blobs: tag records, manifest media types, repository links, access times.

Backed by diskcache (sqlite), shared by every worker process on a host. Reads are direct
(small, indexed, page-cached: tens of microseconds); writes go to a worker thread.

Everything here is a cache of facts that can be re-learnt from upstream: a store that turns out
corrupt (at open or in use) is moved aside (``metadata.corrupt_moved_aside``) and a fresh one
started; a store that fails otherwise (disk full, locked) answers "don't know" for reads and
drops writes. Nothing here ever fails a request. Unknown links fail closed: the proxy asks
upstream to confirm before serving content to a repository.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

import diskcache
import structlog

from mirrorcache.oci.reference import Digest

log = structlog.get_logger("mirrorcache.metadata")

#: A repository link lives this long after its last refresh (a month).
LINK_TTL = 30 * 86400.0
#: Tag records outlive their TTL (for stale-if-error) but not forever.
TAG_RECORD_TTL = 90 * 86400.0
_ATIME_EVERY = 3600.0
#: After a corrupt store was replaced, readiness says "degraded" this long (facts re-learnt).
RELEARN_SECONDS = 60.0
#: A store that could not be opened at all is retried at most this often.
REOPEN_EVERY = 30.0

_DB_FILE = "cache.db"
#: sqlite result codes that mean the file itself is damaged (SQLITE_CORRUPT, SQLITE_NOTADB).
_CORRUPT_CODES = frozenset({11, 26})

T = TypeVar("T")


def is_corruption(exc: BaseException) -> bool:
    """Whether an error says the sqlite file is damaged (not merely busy or full)."""
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return (code & 0xFF) in _CORRUPT_CODES
    return not isinstance(exc, sqlite3.OperationalError)


@dataclass(frozen=True, slots=True)
class TagRecord:
    """What a tag pointed at, and when upstream last confirmed it."""

    digest: Digest
    media_type: str
    size: int
    checked_at: float

    def age(self, now: float | None = None) -> float:
        return (time.time() if now is None else now) - self.checked_at


@runtime_checkable
class SharedMetadata(Protocol):
    """Optional capability of a metadata store every replica shares (S3): the owning replica
    that revalidated a tag or fetched a digest has written its tag record or repository link,
    so another replica taking its answer only remembers it and does not write it again."""

    def remember_tag(self, upstream: str, repo: str, tag: str, rec: TagRecord) -> None:
        """This replica's copy of a tag record another replica wrote to the shared store."""

    def remember_link(self, upstream: str, repo: str, digest: Digest) -> None:
        """This replica's copy of a repository link another replica wrote."""


class MetadataStore(Protocol):
    """What the proxy and the sweeper need of a metadata store: :class:`Metadata` (diskcache,
    one host) and :class:`~mirrorcache.storage.s3_metadata.S3Metadata` (S3, every replica).

    Reads are async (S3 may have to be asked); nothing here ever raises to a request: a store
    that fails answers "don't know" (None / False) and drops or defers writes.
    """

    async def aget_tag(self, upstream: str, repo: str, tag: str) -> TagRecord | None: ...

    async def set_tag(self, upstream: str, repo: str, tag: str, rec: TagRecord) -> None: ...

    async def drop_tag(self, upstream: str, repo: str, tag: str, digest: Digest) -> None: ...

    async def forget(self, upstream: str, repo: str, digest: Digest) -> None: ...

    async def aget_media_type(self, upstream: str, repo: str, digest: Digest) -> str | None: ...

    async def set_media_type(self, upstream: str, repo: str, digest: Digest,
                             media_type: str) -> None: ...

    async def ais_linked(self, upstream: str, repo: str, digest: Digest) -> bool: ...

    async def link(self, upstream: str, repo: str, digest: Digest) -> None: ...

    async def touch(self, digest: Digest) -> None: ...

    def problem(self) -> str | None: ...

    def close(self) -> None: ...


class Metadata:
    """The metadata store of one cache (satisfies :class:`MetadataStore`; the sync reads are
    for the lifecycle commands, which run beside the store on one host)."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self._path = path
        self._clock = clock
        self._cache: diskcache.Cache | None = None
        self._identity: tuple[int, int] | None = None
        self._atime_written: dict[str, float] = {}
        self._problem: str | None = None
        self._problem_until = 0.0
        self._next_open = 0.0
        self._open()

    # -- lifecycle and recovery
    def _open(self) -> None:
        self._next_open = self._clock() + REOPEN_EVERY
        for attempt in range(2):
            try:
                self._path.mkdir(parents=True, exist_ok=True)
                cache = diskcache.Cache(str(self._path), timeout=30, statistics=False)
                st = os.stat(self._path / _DB_FILE)
            except Exception as exc:  # sqlite, OSError, diskcache's own
                if attempt == 0 and is_corruption(exc):
                    self._move_aside(exc)
                    continue
                self._cache = None
                self._set_problem(f"metadata store unavailable: {exc}", forever=True)
                log.error("metadata.open_failed", path=str(self._path), error=str(exc))
                return
            self._cache, self._identity = cache, (st.st_dev, st.st_ino)
            if self._problem is not None and self._problem_until == float("inf"):
                self._set_problem("metadata store reopened; re-learning facts")
            return

    def _move_aside(self, exc: BaseException) -> None:
        """Move the damaged store out of the way (unless another worker already did)."""
        try:
            st = os.stat(self._path / _DB_FILE)
            current: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except OSError:
            current = None
        if current is not None and (self._identity is None or current == self._identity):
            aside = self._path.with_name(
                f"{self._path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}")
            try:
                os.rename(self._path, aside)
                log.error("metadata.corrupt_moved_aside", path=str(self._path),
                          moved_to=str(aside), error=str(exc))
            except OSError as err:
                log.error("metadata.move_aside_failed", path=str(self._path), error=str(err))
        self._identity = None
        self._set_problem(f"metadata store was corrupt ({exc}); moved aside, re-learning")

    def _set_problem(self, reason: str, *, forever: bool = False) -> None:
        self._problem = reason
        self._problem_until = float("inf") if forever else self._clock() + RELEARN_SECONDS

    def _recover(self, exc: BaseException, used: diskcache.Cache | None) -> None:
        if self._cache is not used:
            return  # another call already replaced the store
        if is_corruption(exc):
            old, self._cache = self._cache, None
            if old is not None:
                _close_quietly(old)
            self._move_aside(exc)
            self._open()
        else:
            log.warning("metadata.operation_failed", error=str(exc))

    def problem(self) -> str | None:
        """Why the store is degraded right now, or None."""
        if self._cache is None and self._clock() >= self._next_open:
            self._open()
        if self._problem is not None and self._clock() >= self._problem_until:
            self._problem = None
        return self._problem

    def close(self) -> None:
        if self._cache is not None:
            _close_quietly(self._cache)

    def _read(self, fn: Callable[[diskcache.Cache], T], default: T) -> T:
        cache = self._cache
        if cache is None:
            self.problem()  # maybe time to retry opening
            return default
        try:
            return fn(cache)
        except Exception as exc:  # metadata never fails a request
            self._recover(exc, cache)
            return default

    async def _write(self, fn: Callable[[diskcache.Cache], Any]) -> None:
        cache = self._cache
        if cache is None:
            self.problem()
            return
        try:
            await asyncio.to_thread(fn, cache)
        except Exception as exc:
            self._recover(exc, cache)

    # -- tags
    def get_tag(self, upstream: str, repo: str, tag: str) -> TagRecord | None:
        raw = self._read(lambda c: c.get(f"tag:{upstream}/{repo}:{tag}"), None)
        if not isinstance(raw, tuple) or len(raw) != 4:
            return None
        digest, media_type, size, checked_at = raw
        try:
            return TagRecord(Digest(*digest.split(":", 1)), media_type, size, checked_at)
        except (TypeError, ValueError):
            return None

    async def aget_tag(self, upstream: str, repo: str, tag: str) -> TagRecord | None:
        return self.get_tag(upstream, repo, tag)

    async def set_tag(self, upstream: str, repo: str, tag: str, rec: TagRecord) -> None:
        value = (str(rec.digest), rec.media_type, rec.size, rec.checked_at)
        await self._write(lambda c: c.set(f"tag:{upstream}/{repo}:{tag}", value,
                                          expire=TAG_RECORD_TTL))

    async def drop_tag(self, upstream: str, repo: str, tag: str, digest: Digest) -> None:
        """Forget a tag record, if it still points at ``digest`` (eviction)."""
        key = f"tag:{upstream}/{repo}:{tag}"

        def drop(c: diskcache.Cache) -> None:
            with c.transact():
                raw = c.get(key)
                if isinstance(raw, tuple) and raw and raw[0] == str(digest):
                    c.delete(key)

        await self._write(drop)

    async def forget(self, upstream: str, repo: str, digest: Digest) -> None:
        """Drop the repository link and media type of an evicted digest."""
        await self._write(lambda c: (c.delete(f"link:{upstream}/{repo}@{digest}"),
                                     c.delete(f"mt:{upstream}/{repo}@{digest}")))

    # -- manifest media types, as one upstream repository said them (for manifests whose
    # body does not say its own type): never shared across upstreams or repositories
    def get_media_type(self, upstream: str, repo: str, digest: Digest) -> str | None:
        value = self._read(lambda c: c.get(f"mt:{upstream}/{repo}@{digest}"), None)
        return value if isinstance(value, str) else None

    async def aget_media_type(self, upstream: str, repo: str, digest: Digest) -> str | None:
        return self.get_media_type(upstream, repo, digest)

    async def set_media_type(self, upstream: str, repo: str, digest: Digest,
                             media_type: str) -> None:
        await self._write(lambda c: c.set(f"mt:{upstream}/{repo}@{digest}", media_type,
                                          expire=LINK_TTL))

    # -- repository links: upstream confirmed that this repository holds this digest
    def is_linked(self, upstream: str, repo: str, digest: Digest) -> bool:
        return self._read(lambda c: f"link:{upstream}/{repo}@{digest}" in c, False)

    async def ais_linked(self, upstream: str, repo: str, digest: Digest) -> bool:
        return self.is_linked(upstream, repo, digest)

    async def link(self, upstream: str, repo: str, digest: Digest) -> None:
        await self._write(lambda c: c.set(f"link:{upstream}/{repo}@{digest}", 1,
                                          expire=LINK_TTL))

    # -- last access, for eviction; written at most once an hour per digest and process
    async def touch(self, digest: Digest) -> None:
        key = str(digest)
        now = time.time()
        if now - self._atime_written.get(key, 0.0) < _ATIME_EVERY:
            return
        self._atime_written[key] = now
        await self._write(lambda c: c.set(f"atime:{key}", now))

    def last_access(self, digest: Digest) -> float | None:
        value = self._read(lambda c: c.get(f"atime:{digest}"), None)
        return float(value) if isinstance(value, int | float) else None


def _close_quietly(cache: diskcache.Cache) -> None:
    try:
        cache.close()
    except Exception as exc:
        log.warning("metadata.close_failed", error=str(exc))
