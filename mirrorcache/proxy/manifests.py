"""Pull-through manifests: immutable by digest, tags trusted for ``tag_ttl`` then revalidated."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

import structlog
from cachetools import LRUCache

from mirrorcache.coalesce import Coalescer
from mirrorcache.config import UpstreamConfig
from mirrorcache.errors import ErrorCode, OCIError
from mirrorcache.metrics import Metrics
from mirrorcache.oci import media
from mirrorcache.oci.digest import digest_of
from mirrorcache.oci.reference import Digest, Reference
from mirrorcache.proxy.owners import Owners, manifest_key, tag_key
from mirrorcache.proxy.routing import Target
from mirrorcache.proxy.upstreams import Upstreams
from mirrorcache.proxy.visibility import RepositoryGate
from mirrorcache.storage.base import (
    BlobStore,
    FetchClaims,
    LocalTier,
    StorageError,
    put_bytes,
    read_bytes,
)
from mirrorcache.storage.metadata import MetadataStore, SharedMetadata, TagRecord
from mirrorcache.upstream.client import UpstreamUnavailable

log = structlog.get_logger("mirrorcache.manifests")

#: Bytes of manifests kept in memory per process.
MEMO_BYTES = 32 * 1024 * 1024
#: Tag records kept in memory per process.
TAG_MEMO = 20000
#: How often a process waiting for another process's manifest fetch looks for its result.
PEER_POLL = 0.02
#: Extra patience, beyond the upstream read timeout, before fetching it itself after all.
PEER_GRACE = 5.0


@dataclass(frozen=True, slots=True)
class ManifestResult:
    """A manifest to answer with; ``body`` is None for HEAD answers not read from cache."""

    digest: Digest
    media_type: str
    size: int
    body: bytes | None
    cache: str  # hit | miss | stale | relay (answered by upstream, not cached) | bypass
    warning: str | None = None


def _is_transient(err: OCIError) -> bool:
    """Upstream faults for which serving a stale tag beats failing."""
    return isinstance(err, UpstreamUnavailable) or err.status in (429, 502, 503, 504)


class ManifestService:
    """Answers manifest requests from the cache, asking upstream only when it must."""

    def __init__(self, upstreams: Upstreams, configs: dict[str, UpstreamConfig],
                 store: BlobStore, meta: MetadataStore, coalescer: Coalescer,
                 metrics: Metrics, gate: RepositoryGate | None = None,
                 claims: FetchClaims | None = None, owners: Owners | None = None) -> None:
        self._upstreams = upstreams
        #: Other replicas owning digests and tags (a cluster), asked first; None: alone.
        self._owners = owners
        #: Cross-process single-flight, when the store offers it; else per process only.
        self._claims = claims
        self._configs = configs
        self._store = store
        self._meta = meta
        self._gate = gate or RepositoryGate(configs, meta)
        self._coalescer = coalescer
        self._metrics = metrics
        self._background: set[asyncio.Task[object]] = set()
        # Manifests are immutable and small: the hot ones stay in memory (bounded in bytes).
        self._memo: LRUCache[Digest, tuple[bytes, str | None]] = LRUCache(
            maxsize=MEMO_BYTES, getsizeof=lambda v: len(v[0]) + 200)
        self._tags: LRUCache[tuple[str, str, str], TagRecord] = LRUCache(maxsize=TAG_MEMO)

    async def get(self, target: Target, ref: Reference, accept: str | None, *,
                  head: bool, ask_owner: bool = True) -> ManifestResult:
        """``ask_owner`` False: the request comes from a peer replica, never forwarded."""
        if ref.digest is not None:
            return await self._by_digest(target, ref.digest, accept, head=head,
                                         ask_owner=ask_owner)
        assert ref.tag is not None
        return await self._by_tag(target, ref.tag, accept, head=head, ask_owner=ask_owner)

    # -- cache helpers
    async def _cached(self, target: Target, digest: Digest, cache: str
                      ) -> ManifestResult | None:
        """The stored manifest, its media type as ``target``'s upstream gave it. The caller
        has checked ``target`` may see ``digest``."""
        memo = self._memo.get(digest)
        if memo is not None:
            body, declared = memo
        else:
            try:
                body = await read_bytes(self._store, digest, media.MAX_MANIFEST_BYTES)
            except StorageError:
                return None
            declared = media.declared_media_type(body)
            self._memo[digest] = (body, declared)
        mt = declared or await self._meta.aget_media_type(target.upstream, target.repository,
                                                   digest) or media.sniff_media_type(body)
        return ManifestResult(digest, mt, len(body), body, cache)

    async def _have(self, digest: Digest) -> bool:
        if digest in self._memo:
            return True
        try:
            return await self._store.stat(digest) is not None
        except StorageError:
            return False

    async def _tag_record(self, target: Target, tag: str, ttl: float) -> TagRecord | None:
        """The tag record: from memory while fresh, else from the shared metadata store
        (another worker may have refreshed it)."""
        key = (target.upstream, target.repository, tag)
        rec = self._tags.get(key)
        if rec is None or rec.age() >= ttl:
            rec = await self._meta.aget_tag(target.upstream, target.repository, tag)
            if rec is not None:
                self._tags[key] = rec
        return rec

    async def _store_manifest(self, target: Target, digest: Digest, body: bytes,
                              media_type: str, *, from_owner: bool = False) -> None:
        """``from_owner``: the owning replica answered it and has stored it; over a shared
        store (LocalTier) this replica keeps a local copy only."""
        # Linked (and typed) before it becomes visible: this repository's own requests never
        # need upstream to confirm it.
        if from_owner and isinstance(self._meta, SharedMetadata):
            self._meta.remember_link(target.upstream, target.repository, digest)
        else:
            await self._meta.link(target.upstream, target.repository, digest)
        if media.declared_media_type(body) is None:
            await self._meta.set_media_type(target.upstream, target.repository, digest,
                                            media_type)
        try:
            if from_owner and isinstance(self._store, LocalTier):
                async with self._store.local_writer(digest) as w:
                    await w.write(body)
                    await w.commit()
            else:
                await put_bytes(self._store, digest, body)
        except StorageError as exc:
            log.warning("manifest.cache_write_failed", digest=str(digest), error=str(exc))

    # -- by digest
    async def _by_digest(self, target: Target, digest: Digest, accept: str | None, *,
                         head: bool, ask_owner: bool = True) -> ManifestResult:
        cfg = self._configs[target.upstream]

        async def confirm() -> int | None:
            return (await self._head_upstream(target, str(digest), accept)).size

        if await self._have(digest):
            # Cached, maybe via another repository: the one repository rule decides.
            await self._gate.admit(target, digest, unknown=ErrorCode.MANIFEST_UNKNOWN,
                                   confirm=confirm)
            stored = await self._cached(target, digest, "hit")
            if stored is not None:
                return stored
        if cfg.offline:
            raise OCIError(ErrorCode.MANIFEST_UNKNOWN, f"{digest} is not cached and upstream "
                           f"{target.upstream} is offline")
        if head:
            return await self._head_upstream(target, str(digest), accept)
        key = ("manifest", target.upstream, target.repository, str(digest))

        async def fetched() -> ManifestResult | None:
            """What another process stored meanwhile (for this repository, usually: the
            one repository rule decides)."""
            if not await self._have(digest):
                return None
            await self._gate.admit(target, digest, unknown=ErrorCode.MANIFEST_UNKNOWN,
                                   confirm=confirm)
            return await self._cached(target, digest, "miss")

        result, joined = await self._coalescer.run(key, lambda: self._across_processes(
            f"manifest:{target.upstream}/{target.repository}@{digest}", target.upstream,
            lambda: self._fetch_digest(target, digest, ask_owner), fetched))
        if joined:
            self._metrics.coalesced.labels("manifest").inc()
        return result

    # -- by tag
    async def _by_tag(self, target: Target, tag: str, accept: str | None, *,
                      head: bool, ask_owner: bool = True) -> ManifestResult:
        cfg = self._configs[target.upstream]
        rec = await self._tag_record(target, tag, cfg.tag_ttl)
        if rec is not None:
            age = rec.age()
            fresh = age < cfg.tag_ttl or cfg.offline
            swr = not fresh and age < cfg.tag_ttl + cfg.tag_stale_while_revalidate
            if fresh or swr:
                # The tag record is this repository's own: its digest is linked to it.
                hit = await self._cached(target, rec.digest, "hit")
                if hit is not None and media.accepts(accept, hit.media_type):
                    if swr:
                        self._revalidate_in_background(target, tag)
                    return hit
        if cfg.offline:
            raise OCIError(ErrorCode.MANIFEST_UNKNOWN, f"tag {tag} is not cached and upstream "
                           f"{target.upstream} is offline")
        if rec is not None and not media.accepts(accept, rec.media_type):
            # An old client that cannot take what the tag canonically is: relay its own view.
            return await self._fetch(target, tag, accept or media.DEFAULT_ACCEPT, expect=None,
                                     cache="relay")
        try:
            result, joined = await self._coalescer.run(
                ("tag", target.upstream, target.repository, tag),
                lambda: self._revalidate_once(target, tag, rec, ask_owner=ask_owner))
        except OCIError as err:
            stale = (await self._cached(target, rec.digest, "stale") if rec is not None
                     else None)
            if stale is None or not _is_transient(err):
                raise
            log.warning("upstream.stale_served", upstream=target.upstream,
                        repository=target.repository, tag=tag, digest=str(rec.digest),  # type: ignore[union-attr]
                        age_s=round(rec.age(), 1), error=err.code)  # type: ignore[union-attr]
            return replace(stale, warning=f'110 mirrorcache "stale: upstream {err.code}"')
        if joined:
            self._metrics.coalesced.labels("tag").inc()
        return result

    def _revalidate_in_background(self, target: Target, tag: str) -> None:
        key = ("tag", target.upstream, target.repository, tag)
        if self._coalescer.is_running(key):
            return

        async def refresh() -> None:
            rec = await self._meta.aget_tag(target.upstream, target.repository, tag)
            try:
                await self._coalescer.run(key, lambda: self._revalidate_once(target, tag, rec))
            except OCIError as err:
                log.warning("manifest.background_refresh_failed", upstream=target.upstream,
                            repository=target.repository, tag=tag, error=err.code)

        task: asyncio.Task[object] = asyncio.ensure_future(refresh())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _revalidate_once(self, target: Target, tag: str, rec: TagRecord | None, *,
                               ask_owner: bool = True) -> ManifestResult:
        """:meth:`_revalidate`, by one of the processes sharing the store at a time: the
        others take the tag record it writes."""
        since = time.time()

        async def refreshed() -> ManifestResult | None:
            now = await self._meta.aget_tag(target.upstream, target.repository, tag)
            if now is None or now.checked_at < since:
                return None
            self._tags[(target.upstream, target.repository, tag)] = now
            same = rec is not None and rec.digest == now.digest
            return await self._cached(target, now.digest, "hit" if same else "miss")

        return await self._across_processes(
            f"tag:{target.upstream}/{target.repository}:{tag}", target.upstream,
            lambda: self._revalidate(target, tag, rec, ask_owner=ask_owner), refreshed)

    async def _across_processes(self, key: str, upstream: str,
                                work: Callable[[], Awaitable[ManifestResult]],
                                stored: Callable[[], Awaitable[ManifestResult | None]]
                                ) -> ManifestResult:
        """Run ``work`` in one of the processes sharing the store (FetchClaims): the others
        poll for what it stores (``stored``), take over if it dies without a result, and
        fetch it themselves after the upstream read timeout. Without FetchClaims (or when
        the claim files fail) this process just runs it."""
        if self._claims is None:
            return await work()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._configs[upstream].read_timeout + PEER_GRACE
        following = False
        while True:
            try:
                claim = self._claims.claim(key)
            except StorageError as exc:
                log.warning("manifest.claim_failed", key=key, error=str(exc))
                return await work()
            if claim is not None:
                done = False
                try:
                    # Another process may have stored it since this one looked.
                    result = await stored() or await work()
                    done = True
                    return result
                except OCIError as exc:
                    with contextlib.suppress(StorageError):
                        claim.fail({"code": exc.code, "message": exc.message,
                                    "status": exc.status})
                    raise
                finally:
                    claim.release(done=done)
            if not following:
                following = True
                self._metrics.coalesced.labels("manifest_peer").inc()
                log.info("manifest.following_peer", key=key)
            found = await stored()
            if found is not None:
                return found
            try:
                peer = self._claims.peer_fetch(key)
            except StorageError as exc:
                log.warning("manifest.claim_failed", key=key, error=str(exc))
                return await work()
            if not peer.alive:
                found = await stored()
                if found is not None:
                    return found
                if peer.error is not None:
                    raise OCIError(ErrorCode.from_wire(peer.error.get("code")),
                                   str(peer.error.get("message", "peer fetch failed")),
                                   status=int(peer.error.get("status", 502)))
                continue  # the claimant is gone without a result: claim it ourselves
            if loop.time() > deadline:
                log.warning("manifest.peer_timeout", key=key)
                return await work()
            await asyncio.sleep(PEER_POLL)

    async def _revalidate(self, target: Target, tag: str, rec: TagRecord | None, *,
                          ask_owner: bool = True) -> ManifestResult:
        """Ask upstream what the tag is now: a HEAD (free on Docker Hub), then a GET by
        digest only when the digest changed or its content is not cached. In a cluster the
        replica owning the tag does that; the others ask it."""
        if ask_owner:
            owned = await self._from_owner(tag_key(target.upstream, target.repository, tag),
                                           target, tag, None)
            if owned is not None:
                if rec is not None and rec.digest == owned.digest:
                    owned = replace(owned, cache="hit")
                await self._set_tag(target, tag, owned, written_by_owner=True)
                return owned
        client = self._upstreams[target.upstream]
        info = await client.head_manifest(target.repository, tag, media.DEFAULT_ACCEPT)
        new_digest = info.digest
        if new_digest is not None:
            # Upstream just said this repository's tag is this digest: it may see it.
            cached = await self._cached(target, new_digest, "hit" if rec is not None
                                        and rec.digest == new_digest else "miss")
            if cached is not None:
                await self._meta.link(target.upstream, target.repository, new_digest)
                await self._set_tag(target, tag, cached)
                return cached
            result = await self._fetch(target, str(new_digest), media.DEFAULT_ACCEPT,
                                       expect=new_digest)
        else:
            result = await self._fetch(target, tag, media.DEFAULT_ACCEPT, expect=None)
        await self._set_tag(target, tag, result)
        return result

    async def _fetch_digest(self, target: Target, digest: Digest, ask_owner: bool
                            ) -> ManifestResult:
        if ask_owner:
            owned = await self._from_owner(manifest_key(digest), target, str(digest), digest)
            if owned is not None:
                return owned
        return await self._fetch(target, str(digest), media.DEFAULT_ACCEPT, expect=digest)

    async def _from_owner(self, key: str, target: Target, reference: str,
                          expect: Digest | None) -> ManifestResult | None:
        """The owning replica's answer, verified and stored; None when this replica owns
        ``key`` or the owner could not answer (the caller then asks upstream itself)."""
        if self._owners is None:
            return None
        owned = await self._owners.manifest(key, target, reference)
        if owned is None:
            return None
        actual = digest_of(owned.body, owned.digest.algorithm)
        if actual != owned.digest or (expect is not None and actual != expect):
            log.error("cluster.manifest_mismatch", upstream=target.upstream,
                      repository=target.repository, reference=reference,
                      expected=str(expect or owned.digest), actual=str(actual))
            return None
        media_type = media.declared_media_type(owned.body) or owned.media_type
        await self._store_manifest(target, actual, owned.body, media_type, from_owner=True)
        return ManifestResult(actual, media_type, len(owned.body), owned.body, "miss")

    async def _set_tag(self, target: Target, tag: str, result: ManifestResult, *,
                       written_by_owner: bool = False) -> None:
        """``written_by_owner``: the owning replica's answer; with shared metadata (S3) it
        wrote the record every replica reads, so this one only remembers it."""
        rec = TagRecord(result.digest, result.media_type, result.size, time.time())
        self._tags[(target.upstream, target.repository, tag)] = rec
        if written_by_owner and isinstance(self._meta, SharedMetadata):
            self._meta.remember_tag(target.upstream, target.repository, tag, rec)
            return
        try:
            await self._meta.set_tag(target.upstream, target.repository, tag, rec)
        except Exception as exc:
            log.warning("manifest.tag_write_failed", error=type(exc).__name__)

    async def _fetch(self, target: Target, reference: str, accept: str, *,
                     expect: Digest | None, cache: str = "miss") -> ManifestResult:
        """GET a manifest from upstream, verify its digest, store it."""
        client = self._upstreams[target.upstream]
        manifest = await client.get_manifest(target.repository, reference, accept)
        body, content_type = manifest.body, manifest.media_type
        want = expect or manifest.digest
        actual = digest_of(body, want.algorithm if want else "sha256")
        if want is not None and actual != want:
            log.error("manifest.digest_mismatch", upstream=target.upstream,
                      repository=target.repository, expected=str(want), actual=str(actual))
            raise OCIError(ErrorCode.DIGEST_INVALID, f"upstream manifest does not match {want}",
                           status=502)
        # The manifest's own mediaType field wins over what this upstream's header claims.
        media_type = media.declared_media_type(body) or (
            content_type if content_type.startswith("application/vnd.")
            else media.sniff_media_type(body))
        await self._store_manifest(target, actual, body, media_type)
        return ManifestResult(actual, media_type, len(body), body, cache)

    async def _head_upstream(self, target: Target, reference: str, accept: str | None
                             ) -> ManifestResult:
        client = self._upstreams[target.upstream]
        info = await client.head_manifest(target.repository, reference,
                                          accept or media.DEFAULT_ACCEPT)
        digest = info.digest or Digest.parse(reference)
        return ManifestResult(digest, info.media_type or media.OCI_MANIFEST, info.size or 0,
                              None, "relay")

    async def wait_background(self) -> None:
        """Wait for background tag refreshes started so far (tests, shutdown)."""
        await asyncio.gather(*list(self._background), return_exceptions=True)

    async def aclose(self) -> None:
        for t in list(self._background):
            t.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
