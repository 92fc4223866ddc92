"""Following another worker process's fetch of a blob through FetchClaims: tail its spool
file, adopt the blob it commits, take over if it dies before sending a byte."""

from __future__ import annotations

import asyncio
import os

import structlog

from mirrorcache.config import UpstreamConfig
from mirrorcache.errors import ErrorCode, OCIError
from mirrorcache.oci.reference import Digest
from mirrorcache.proxy.download import Download, Downloading, _LocalClaim, _StorageFailed
from mirrorcache.proxy.routing import Target
from mirrorcache.storage.base import FetchClaim, FetchClaims, StorageError, blob_claim_key

log = structlog.get_logger("mirrorcache.blobs")

#: How often a process tailing another process's fetch looks at its progress.
PEER_POLL = 0.02
#: Extra patience, beyond the upstream read timeout, before a silent peer fetch is given up.
PEER_GRACE = 5.0


class PeerFollowing(Downloading):
    """The part of BlobService that fetches a blob once across the processes sharing the
    store: claim it and download, or follow the process that has the claim (see blobs.py)."""

    _claims: FetchClaims | None
    _configs: dict[str, UpstreamConfig]
    _downloads: dict[Digest, Download]

    async def _admit(self, target: Target, digest: Digest, fetching_for: Target | None,
                     size: int | None = None) -> None:
        raise NotImplementedError  # BlobService's repository rule

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
                if peer.error is not None and (dl.written > 0 or (
                        owner is not None and (owner.upstream, owner.repository)
                        == (dl.target.upstream, dl.target.repository))):
                    raise OCIError(ErrorCode.from_wire(peer.error.get("code")),
                                   str(peer.error.get("message", "peer fetch failed")),
                                   status=int(peer.error.get("status", 502)))
                if dl.written == 0:  # died, or failed for another repository: ours to fetch
                    log.warning("blob.peer_vanished" if peer.error is None
                                else "blob.peer_failed_elsewhere", digest=str(dl.digest))
                    return True
                raise OCIError(ErrorCode.UNAVAILABLE, "peer fetch died mid-stream", status=503)
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
                raise OCIError(ErrorCode.UNAVAILABLE, "peer fetch made no progress", status=503)
            await asyncio.sleep(PEER_POLL)
