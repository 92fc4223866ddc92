"""Metadata shared by every replica: small JSON objects in S3, a local LRU in front.

The same data as storage/metadata.py (tag records, manifest media types, repository links,
last access times), under ``<prefix>metadata/`` (the layout is in storage/keys.py), so that
a new replica, even one started while upstream is down, serves the last known tag.

Freshness: a replica trusts its in-memory copy of a tag record, or of the *absence* of a
record or link, for ``ttl`` seconds (``storage.s3.metadata_ttl``, 5 s by default); after that
the next async read asks S3 again. Its own writes are visible to itself at once and to other
replicas within ``ttl``. Links and media types, once seen, never change and are trusted until
they expire (a link: ``LINK_TTL`` after it was written). A tag record's ``checked_at`` still
decides, as before, when the proxy revalidates it upstream; ``ttl`` only bounds how long
another replica's newer record can go unseen.

Interface: :class:`~mirrorcache.storage.metadata.MetadataStore` (async reads), which the
diskcache store satisfies too; the sync ``get_tag`` / ``is_linked`` answer from the LRU
alone. S3 failures never raise from here: a read falls back to the last copy this replica
saw (or None), a write keeps the local copy and logs ``storage.metadata_unavailable``;
:meth:`S3Metadata.problem` then says so (readiness: degraded) until a call succeeds again.
Media types are scoped per upstream repository, as in the diskcache store.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any, Protocol

import structlog
from cachetools import LRUCache

from mirrorcache.errors import OCIError
from mirrorcache.oci.reference import Digest
from mirrorcache.storage.base import BlobNotFound, StorageError
from mirrorcache.storage.metadata import (
    _ATIME_EVERY,
    LINK_TTL,
    TAG_RECORD_TTL,
    TagRecord,
)

log = structlog.get_logger("mirrorcache.storage.s3_metadata")

DEFAULT_TTL = 5.0
MAX_ENTRIES = 100_000
#: Largest metadata object read (a tag record is ~200 bytes).
MAX_OBJECT = 64 * 1024
_ABSENT: Any = object()


class S3Caller(Protocol):
    """What the metadata store needs of the S3 blob store: its prefix and retried calls."""

    prefix: str

    async def call(self, operation: str, **kwargs: Any) -> Any: ...


class S3Metadata:
    """Tag records, media types, repository links and access times in S3 (see module doc)."""

    def __init__(self, s3: S3Caller, ttl: float = DEFAULT_TTL, max_entries: int = MAX_ENTRIES,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self._s3 = s3
        self.ttl = ttl
        self._clock = clock
        self._wall = wall
        # key -> (decoded JSON document or _ABSENT, when this replica fetched or wrote it)
        self._lru: LRUCache[str, tuple[Any, float]] = LRUCache(maxsize=max_entries)
        self._atime_written: LRUCache[str, float] = LRUCache(maxsize=max_entries)
        self._inflight: dict[str, asyncio.Future[Any]] = {}
        self._problem: str | None = None

    def close(self) -> None:
        self._lru.clear()

    def problem(self) -> str | None:
        """Why S3 metadata is degraded (the last S3 call failed), or None."""
        return self._problem

    # keys
    def _key(self, *parts: str) -> str:
        return self._s3.prefix + "metadata/" + "/".join(parts)

    def _tag_key(self, upstream: str, repo: str, tag: str) -> str:
        return self._key("tags", upstream, f"{repo}:{tag}")

    def _link_key(self, upstream: str, repo: str, digest: Digest) -> str:
        return self._key("links", upstream, f"{repo}@{digest}")

    def _mt_key(self, upstream: str, repo: str, digest: Digest) -> str:
        return self._key("mediatypes", upstream, f"{repo}@{digest}")

    def _atime_key(self, digest: Digest) -> str:
        return self._key("atime", digest.algorithm, digest.hex)

    # the cache and S3
    def _cached(self, key: str) -> Any:
        entry = self._lru.get(key)
        return _ABSENT if entry is None else entry[0]

    async def _read(self, key: str, *, immutable: bool = False) -> Any:
        """The document under ``key`` (or _ABSENT), from the LRU while fresh, else from S3
        (one GET per key at a time); on S3 failure the last copy seen."""
        entry = self._lru.get(key)
        if entry is not None:
            doc, at = entry
            if (immutable and doc is not _ABSENT) or self._clock() - at < self.ttl:
                return doc
        task = self._inflight.get(key)
        if task is None:
            # A task of its own, so a reader cancelled while it waits (a client gone) does
            # not cancel the GET the other readers of the key wait for.
            task = asyncio.ensure_future(self._fetch(key, entry))
            self._inflight[key] = task
            task.add_done_callback(lambda t: self._fetched(key, t))
        return await asyncio.shield(task)

    def _fetched(self, key: str, task: asyncio.Future[Any]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved: its waiters get it, nobody else logs it

    async def _fetch(self, key: str, entry: tuple[Any, float] | None) -> Any:
        try:
            doc = await self._get(key)
        except StorageError as exc:
            log.warning("storage.metadata_unavailable", op="read", reason=str(exc))
            self._problem = f"S3 metadata unavailable: {exc}"
            return entry[0] if entry is not None else _ABSENT
        self._problem = None
        self._lru[key] = (doc, self._clock())
        return doc

    async def _get(self, key: str) -> Any:
        try:
            resp = await self._s3.call("get_object", Key=key)
        except BlobNotFound:
            return _ABSENT
        body = resp["Body"]
        try:
            raw = b""
            while len(raw) <= MAX_OBJECT:  # a read may return part of the object
                more = await body.read(MAX_OBJECT + 1 - len(raw))
                if not more:
                    break
                raw += more
        except Exception as exc:  # a broken body: as good as unreachable
            raise StorageError(f"reading {key}: {type(exc).__name__}") from None
        finally:
            body.close()
        try:
            doc = json.loads(raw)
        except ValueError:
            log.warning("storage.metadata_corrupt", key=key)
            return _ABSENT
        return doc if isinstance(doc, dict) else _ABSENT

    async def _write(self, key: str, doc: dict[str, Any]) -> None:
        self._lru[key] = (doc, self._clock())
        try:
            await self._s3.call("put_object", Key=key, Body=json.dumps(doc).encode(),
                                ContentType="application/json")
        except StorageError as exc:
            log.warning("storage.metadata_unavailable", op="write", reason=str(exc))
            self._problem = f"S3 metadata unavailable: {exc}"
        else:
            self._problem = None

    async def _delete(self, key: str) -> None:
        self._lru[key] = (_ABSENT, self._clock())
        try:
            await self._s3.call("delete_object", Key=key)
        except BlobNotFound:
            pass
        except StorageError as exc:
            log.warning("storage.metadata_unavailable", op="delete", reason=str(exc))

    # tags
    def _tag_record(self, doc: Any) -> TagRecord | None:
        if not isinstance(doc, dict):
            return None
        try:
            rec = TagRecord(Digest.parse(doc["digest"]), str(doc["media_type"]),
                            int(doc["size"]), float(doc["checked_at"]))
        except (KeyError, TypeError, ValueError, OCIError):
            return None
        return rec if self._wall() - rec.checked_at < TAG_RECORD_TTL else None

    def get_tag(self, upstream: str, repo: str, tag: str) -> TagRecord | None:
        """This replica's copy only (see the module docstring): use :meth:`aget_tag`."""
        return self._tag_record(self._cached(self._tag_key(upstream, repo, tag)))

    async def aget_tag(self, upstream: str, repo: str, tag: str) -> TagRecord | None:
        return self._tag_record(await self._read(self._tag_key(upstream, repo, tag)))

    async def set_tag(self, upstream: str, repo: str, tag: str, rec: TagRecord) -> None:
        await self._write(self._tag_key(upstream, repo, tag), self._tag_doc(rec))

    def remember_tag(self, upstream: str, repo: str, tag: str, rec: TagRecord) -> None:
        """The owning replica's answer, whose record it wrote to S3 itself: kept in this
        replica's LRU only (SharedMetadata)."""
        self._lru[self._tag_key(upstream, repo, tag)] = (self._tag_doc(rec), self._clock())

    @staticmethod
    def _tag_doc(rec: TagRecord) -> dict[str, Any]:
        return {"digest": str(rec.digest), "media_type": rec.media_type, "size": rec.size,
                "checked_at": rec.checked_at}

    async def drop_tag(self, upstream: str, repo: str, tag: str, digest: Digest) -> None:
        """Forget a tag record if it still points at ``digest``."""
        key = self._tag_key(upstream, repo, tag)
        rec = self._tag_record(await self._read(key))
        if rec is not None and rec.digest == digest:
            await self._delete(key)

    async def forget(self, upstream: str, repo: str, digest: Digest) -> None:
        """Drop the repository link and media type of an evicted digest."""
        await self._delete(self._link_key(upstream, repo, digest))
        await self._delete(self._mt_key(upstream, repo, digest))

    # manifest media types
    @staticmethod
    def _media_type(doc: Any) -> str | None:
        value = doc.get("media_type") if isinstance(doc, dict) else None
        return value if isinstance(value, str) else None

    async def aget_media_type(self, upstream: str, repo: str, digest: Digest) -> str | None:
        return self._media_type(await self._read(self._mt_key(upstream, repo, digest),
                                                 immutable=True))

    async def set_media_type(self, upstream: str, repo: str, digest: Digest,
                             media_type: str) -> None:
        await self._write(self._mt_key(upstream, repo, digest), {"media_type": media_type})

    # repository links
    def _linked(self, doc: Any) -> bool:
        at = doc.get("linked_at") if isinstance(doc, dict) else None
        return isinstance(at, int | float) and self._wall() - at < LINK_TTL

    def is_linked(self, upstream: str, repo: str, digest: Digest) -> bool:
        return self._linked(self._cached(self._link_key(upstream, repo, digest)))

    async def ais_linked(self, upstream: str, repo: str, digest: Digest) -> bool:
        return self._linked(await self._read(self._link_key(upstream, repo, digest),
                                             immutable=True))

    def remember_link(self, upstream: str, repo: str, digest: Digest) -> None:
        """A link the owning replica wrote to S3 itself: kept in this replica's LRU only."""
        self._lru[self._link_key(upstream, repo, digest)] = ({"linked_at": self._wall()},
                                                             self._clock())

    async def link(self, upstream: str, repo: str, digest: Digest) -> None:
        await self._write(self._link_key(upstream, repo, digest), {"linked_at": self._wall()})

    # last access, written at most once an hour per digest and replica
    async def touch(self, digest: Digest) -> None:
        key = str(digest)
        now = self._wall()
        if now - self._atime_written.get(key, 0.0) < _ATIME_EVERY:
            return
        self._atime_written[key] = now
        await self._write(self._atime_key(digest), {"at": now})

    @staticmethod
    def _at(doc: Any) -> float | None:
        at = doc.get("at") if isinstance(doc, dict) else None
        return float(at) if isinstance(at, int | float) else None

    def last_access(self, digest: Digest) -> float | None:
        return self._at(self._cached(self._atime_key(digest)))

    async def alast_access(self, digest: Digest) -> float | None:
        return self._at(await self._read(self._atime_key(digest)))
