"""Metadata beside the blobs: tag records, manifest media types, repository links, access times.

Backed by diskcache (sqlite), shared by every worker process on a host. Reads are direct
(small, indexed, page-cached: tens of microseconds); writes go to a worker thread.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

import diskcache

from mirrorcache.oci.reference import Digest

#: A repository link lives this long after its last refresh (a month).
LINK_TTL = 30 * 86400.0
#: Tag records outlive their TTL (for stale-if-error) but not forever.
TAG_RECORD_TTL = 90 * 86400.0
_ATIME_EVERY = 3600.0


@dataclass(frozen=True, slots=True)
class TagRecord:
    """What a tag pointed at, and when upstream last confirmed it."""

    digest: Digest
    media_type: str
    size: int
    checked_at: float

    def age(self, now: float | None = None) -> float:
        return (time.time() if now is None else now) - self.checked_at


class Metadata:
    """The metadata store of one cache."""

    def __init__(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self._cache = diskcache.Cache(str(path), timeout=30, statistics=False)
        self._atime_written: dict[str, float] = {}

    def close(self) -> None:
        self._cache.close()

    # tags
    def get_tag(self, upstream: str, repo: str, tag: str) -> TagRecord | None:
        raw = self._cache.get(f"tag:{upstream}/{repo}:{tag}")
        if not isinstance(raw, tuple) or len(raw) != 4:
            return None
        digest, media_type, size, checked_at = raw
        return TagRecord(Digest(*digest.split(":", 1)), media_type, size, checked_at)

    async def set_tag(self, upstream: str, repo: str, tag: str, rec: TagRecord) -> None:
        value = (str(rec.digest), rec.media_type, rec.size, rec.checked_at)
        await asyncio.to_thread(self._cache.set, f"tag:{upstream}/{repo}:{tag}", value,
                                expire=TAG_RECORD_TTL)

    # manifest media types (content-addressed, so global)
    def get_media_type(self, digest: Digest) -> str | None:
        value = self._cache.get(f"mt:{digest}")
        return value if isinstance(value, str) else None

    async def set_media_type(self, digest: Digest, media_type: str) -> None:
        await asyncio.to_thread(self._cache.set, f"mt:{digest}", media_type)

    # repository links: upstream confirmed that this repository holds this digest
    def is_linked(self, upstream: str, repo: str, digest: Digest) -> bool:
        return f"link:{upstream}/{repo}@{digest}" in self._cache

    async def link(self, upstream: str, repo: str, digest: Digest) -> None:
        await asyncio.to_thread(self._cache.set, f"link:{upstream}/{repo}@{digest}", 1,
                                expire=LINK_TTL)

    # last access, for eviction; written at most once an hour per digest and process
    async def touch(self, digest: Digest) -> None:
        key = str(digest)
        now = time.time()
        if now - self._atime_written.get(key, 0.0) < _ATIME_EVERY:
            return
        self._atime_written[key] = now
        await asyncio.to_thread(self._cache.set, f"atime:{key}", now)

    def last_access(self, digest: Digest) -> float | None:
        value = self._cache.get(f"atime:{digest}")
        return float(value) if isinstance(value, int | float) else None
