"""The internal endpoint other replicas ask as owner: ``/_mirrorcache/peer/v1/...``.

Outside ``/v2/``: no public route leads here, and the public handlers never read the peer
headers, so a client cannot turn a ``/v2/`` request into a peer request. Every request must
carry an HMAC of the shared secret over method, path with query, and a timestamp within 60 s
(401 otherwise). The asking replica states the upstream and repository; this replica's own
repository rule (RepositoryGate, in the services) decides, as for any client, and its own
single-flight fetches once and streams while the blob lands. A peer request is never
forwarded to another replica.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web

from mirrorcache.api.handlers import serve_blob, serve_manifest
from mirrorcache.api.keys import KIND_KEY, TARGET_KEY
from mirrorcache.api.services import SERVICES
from mirrorcache.cluster import signing
from mirrorcache.cluster.client import PREFIX
from mirrorcache.errors import ErrorCode, OCIError
from mirrorcache.oci.reference import Digest, Reference
from mirrorcache.proxy.routing import Target

log = structlog.get_logger("mirrorcache.cluster")


class PeerEndpoint:
    """The handlers, holding the secret and the clock."""

    def __init__(self, secret: str, clock: Callable[[], float] = time.time) -> None:
        self._secret = secret
        self._clock = clock

    def _check(self, request: web.Request, kind: str) -> Target:
        request[KIND_KEY] = f"peer_{kind}"
        why = signing.verify(self._secret, request.method, request.raw_path,
                             request.headers.get(signing.TIME_HEADER),
                             request.headers.get(signing.SIGNATURE_HEADER), self._clock())
        if why is not None:
            log.warning("cluster.peer_rejected", reason=why, remote=request.remote,
                        path=request.path[:200])
            raise OCIError(ErrorCode.UNAUTHORIZED, "peer request not authenticated",
                           status=401)
        upstream = request.query.get("upstream", "")
        repository = request.query.get("repository", "")
        if not upstream or not repository:
            raise OCIError(ErrorCode.NAME_INVALID, "upstream and repository are required",
                           status=400)
        target = request.app[SERVICES].router.resolve(f"{upstream}/{repository}")
        if target.upstream != upstream:
            raise OCIError(ErrorCode.NAME_UNKNOWN, f"unknown upstream {upstream!r}", status=404)
        request[TARGET_KEY] = target
        return target

    async def blob(self, request: web.Request) -> web.StreamResponse:
        target = self._check(request, "blob")
        digest = Digest.parse(request.match_info["digest"])
        return await self._counted(request, "blob",
                                   lambda: serve_blob(request, target, digest, ask_owner=False))

    async def manifest(self, request: web.Request) -> web.StreamResponse:
        target = self._check(request, "manifest")
        ref = Reference.parse(request.match_info["reference"])
        return await self._counted(request, "manifest", lambda: serve_manifest(
            request, target, ref, ask_owner=False))

    async def _counted(self, request: web.Request, kind: str,
                       serve: Callable[[], Awaitable[web.StreamResponse]]
                       ) -> web.StreamResponse:
        metrics = request.app[SERVICES].metrics
        try:
            resp = await serve()
        except OCIError as exc:
            metrics.peer_served.labels(kind, str(exc.status)).inc()
            raise
        metrics.peer_served.labels(kind, str(resp.status)).inc()
        return resp


def add_peer_routes(app: web.Application, secret: str,
                    clock: Callable[[], float] = time.time) -> None:
    ep = PeerEndpoint(secret, clock)
    app.router.add_get(PREFIX + "/blobs/{digest}", ep.blob)
    app.router.add_get(PREFIX + "/manifests/{reference}", ep.manifest)
