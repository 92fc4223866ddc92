"""Asking the owning replica: a blob body streamed while the owner fetches it, a manifest,
a tag's current manifest. Implements ``proxy.owners.Owners``.

Availability wins over deduplication: an owner that is unreachable, answers a server error,
or sends no response head within ``owner_first_byte_timeout`` is skipped, and this replica
fetches upstream itself (``cluster.peer_fallback``, ``mirrorcache_peer_fallbacks_total``).
A body that breaks mid-stream is resumed from upstream by the Download's Range resume.
The owner's refusals (404, 403: its repository rule decides) are relayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from urllib.parse import urlencode

import aiohttp
import structlog
import yarl

from mirrorcache.cluster import signing
from mirrorcache.cluster.membership import Membership
from mirrorcache.errors import ErrorCode, OCIError, error_from_upstream
from mirrorcache.metrics import Metrics
from mirrorcache.oci import media
from mirrorcache.oci.reference import Digest
from mirrorcache.proxy.owners import BlobOpener, OwnedManifest, blob_key
from mirrorcache.proxy.routing import Target
from mirrorcache.upstream.body import BodyRefused, BodyTooLarge, read_capped
from mirrorcache.upstream.registry import BlobBody

log = structlog.get_logger("mirrorcache.cluster")

PREFIX = "/_mirrorcache/peer/v1"
#: Owner answers relayed to the client rather than fallen back from.
RELAYED = (403, 404)


class PeerUnavailable(Exception):
    """The owner could not answer (in time): fetch it yourself."""

    def __init__(self, result: str, detail: str) -> None:
        super().__init__(detail)
        self.result = result
        self.detail = detail


class PeerClient:
    """Requests to other replicas, signed with the shared secret."""

    def __init__(self, membership: Membership, session: aiohttp.ClientSession,
                 metrics: Metrics, clock: Callable[[], float] = time.time) -> None:
        self.membership = membership
        self._cfg = membership.cfg
        self._session = session
        self._metrics = metrics
        self._clock = clock

    def _path(self, kind: str, reference: str, target: Target) -> str:
        query = urlencode({"upstream": target.upstream, "repository": target.repository})
        return f"{PREFIX}/{kind}/{reference}?{query}"

    @asynccontextmanager
    async def _request(self, member: str, kind: str, path_qs: str
                       ) -> AsyncIterator[aiohttp.ClientResponse]:
        """A signed GET to ``member`` whose response head arrived within the first-byte
        timeout; failures are PeerUnavailable (and mark the member down when it is gone)."""
        headers = signing.headers(self._cfg.secret, "GET", path_qs, self._clock())
        timeout = aiohttp.ClientTimeout(total=None,
                                        sock_connect=self._cfg.owner_first_byte_timeout,
                                        sock_read=self._cfg.peer_request_timeout)
        # Sent as signed: yarl must not re-encode the query (%2F in the repository).
        url = yarl.URL(f"{self.membership.scheme}://{member}{path_qs}", encoded=True)
        try:
            resp = await asyncio.wait_for(
                self._session.get(url, headers=headers, timeout=timeout, ssl=False,
                                  allow_redirects=False),
                self._cfg.owner_first_byte_timeout)
        except TimeoutError:
            raise PeerUnavailable("timeout", "no answer within owner_first_byte_timeout"
                                  ) from None
        except (aiohttp.ClientError, OSError) as exc:
            self.membership.mark_down(member, type(exc).__name__)
            raise PeerUnavailable("unreachable", type(exc).__name__) from None
        try:
            if resp.status == 401:
                log.error("cluster.peer_auth_failed", member=member,
                          hint="every replica needs the same cluster.secret_file")
                raise PeerUnavailable("error", "owner refused our signature")
            if resp.status in RELAYED:
                try:
                    body = await asyncio.wait_for(resp.content.read(64 * 1024),
                                                  self._cfg.peer_request_timeout)
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    # Not an answer: an owner cut short is one that could not answer.
                    raise PeerUnavailable("error", f"refusal body: {type(exc).__name__}"
                                          ) from None
                raise error_from_upstream(resp.status, body, ErrorCode.BLOB_UNKNOWN
                                          if kind == "blobs" else ErrorCode.MANIFEST_UNKNOWN)
            if resp.status != 200:
                raise PeerUnavailable("error", f"owner answered {resp.status}")
            yield resp
        finally:
            resp.release()

    def _fallback(self, kind: str, member: str, target: Target, reference: str,
                  exc: PeerUnavailable) -> None:
        self._metrics.peer_requests.labels(kind, exc.result).inc()
        self._metrics.peer_fallbacks.labels(kind).inc()
        log.warning("cluster.peer_fallback", kind=kind, owner=member, upstream=target.upstream,
                    repository=target.repository, reference=reference, reason=exc.result,
                    detail=exc.detail)

    # -- blobs
    def blob_source(self, target: Target, digest: Digest, upstream: BlobOpener
                    ) -> BlobOpener | None:
        member = self.membership.owner(blob_key(digest))
        if self.membership.is_self(member):
            return None
        return OwnerFirst(self, member, target, upstream)

    @asynccontextmanager
    async def open_peer_blob(self, member: str, target: Target, digest: Digest
                             ) -> AsyncIterator[BlobBody]:
        async with self._request(member, "blobs", self._path("blobs", str(digest), target)
                                 ) as resp:
            # Each read waits at most peer_request_timeout, also on the threaded receive
            # path: an owner that stalls without closing is a broken body, resumed upstream.
            body = BlobBody(f"peer {member}", digest, resp, size=resp.content_length, start=0,
                            length=resp.content_length, partial=False,
                            read_timeout=self._cfg.peer_request_timeout)
            try:
                yield body
            finally:
                body.close()

    # -- manifests
    async def manifest(self, key: str, target: Target, reference: str
                       ) -> OwnedManifest | None:
        member = self.membership.owner(key)
        if self.membership.is_self(member):
            return None
        try:
            async with self._request(member, "manifests",
                                     self._path("manifests", reference, target)) as resp:
                try:
                    # The whole body (one read returns only what is buffered), capped.
                    body = await asyncio.wait_for(
                        read_capped(resp, media.MAX_MANIFEST_BYTES, "peer manifest"),
                        self._cfg.peer_request_timeout)
                except BodyTooLarge:
                    raise PeerUnavailable("error", "manifest too large") from None
                except (aiohttp.ClientError, TimeoutError, BodyRefused) as exc:
                    raise PeerUnavailable("error", f"body: {type(exc).__name__}") from None
                try:
                    digest = Digest.parse(resp.headers.get("Docker-Content-Digest", ""))
                except OCIError:
                    raise PeerUnavailable("error", "no digest in the owner's answer") from None
                if "Warning" in resp.headers:
                    # The owner served a stale copy (its upstream failing): not an answer to
                    # trust for a whole TTL; this replica tries upstream itself.
                    raise PeerUnavailable("stale", resp.headers["Warning"][:200])
                mt = resp.headers.get("Content-Type", "") or media.sniff_media_type(body)
        except PeerUnavailable as exc:
            self._fallback("manifest", member, target, reference, exc)
            return None
        except OCIError:
            self._metrics.peer_requests.labels("manifest", "refused").inc()
            raise
        self._metrics.peer_requests.labels("manifest", "ok").inc()
        return OwnedManifest(digest, mt, body)


class OwnerFirst:
    """A Download's source: the owner's stream first, upstream if the owner cannot answer
    and for every resume after the owner's stream broke."""

    def __init__(self, client: PeerClient, member: str, target: Target,
                 upstream: BlobOpener) -> None:
        self._client = client
        self._member = member
        self._target = target
        self._upstream = upstream
        self._tried = False
        #: The owner did not deliver the whole blob (OwnerStream): upstream did.
        self.owner_failed = False

    @asynccontextmanager
    async def open_blob(self, repo: str, digest: Digest, offset: int = 0,
                        end: int | None = None) -> AsyncIterator[BlobBody]:
        async with contextlib.AsyncExitStack() as stack:
            body: BlobBody | None = None
            if not self._tried and offset == 0 and end is None:
                self._tried = True
                try:
                    body = await stack.enter_async_context(
                        self._client.open_peer_blob(self._member, self._target, digest))
                except PeerUnavailable as exc:
                    self._client._fallback("blob", self._member, self._target, str(digest),
                                           exc)
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    # Whatever else failed on the way to the owner: still upstream's turn.
                    self._client._fallback("blob", self._member, self._target, str(digest),
                                           PeerUnavailable("error", type(exc).__name__))
                except OCIError:
                    self._client._metrics.peer_requests.labels("blob", "refused").inc()
                    raise
                else:
                    self._client._metrics.peer_requests.labels("blob", "ok").inc()
                    log.info("cluster.blob_from_owner", owner=self._member, digest=str(digest),
                             size=body.size)
            elif self._tried and offset > 0:
                # The owner's stream broke (it died, or cut a bad body): resume upstream.
                self._client._fallback("blob", self._member, self._target, str(digest),
                                       PeerUnavailable("broken", f"resumed upstream at {offset}"))
            if body is None:
                # Whatever this replica fetches upstream, the owner will not publish for it.
                self.owner_failed = True
                body = await stack.enter_async_context(
                    self._upstream.open_blob(repo, digest, offset, end))
            yield body
