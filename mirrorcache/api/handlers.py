"""Thin handlers: parse and validate, call a service, write the response."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import io
import os
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.helpers import ETAG_ANY, ETag
from aiohttp.web_fileresponse import _FileResponseResult
from prometheus_client import CONTENT_TYPE_LATEST

from mirrorcache.api.access import enforce_policy
from mirrorcache.api.inflight import InflightBlobResponse, StoredBlobResponse
from mirrorcache.api.keys import CACHE_KEY, KIND_KEY, RESPONSE_KEY, TARGET_KEY
from mirrorcache.api.paths import V2Path, parse_artifact_type, parse_page, parse_v2_path
from mirrorcache.api.services import SERVICES
from mirrorcache.api.streaming import corked, count_sent, send_chunks
from mirrorcache.errors import ErrorCode, OCIError
from mirrorcache.oci.reference import Digest, Reference, is_digest, validate_tag
from mirrorcache.proxy.blobs import UPSTREAM_CHUNK, CachedBlob, InflightBlob, PassthroughBlob
from mirrorcache.proxy.passthrough import Relayed, paginate_tags
from mirrorcache.proxy.routing import Target
from mirrorcache.storage.base import StorageError

log = structlog.get_logger("mirrorcache.api")

API_HEADERS = {"Docker-Distribution-API-Version": "registry/2.0"}
READ_METHODS = ("GET", "HEAD")



async def v2(request: web.Request) -> web.StreamResponse:
    """Every /v2/ endpoint: one entry so every request is validated the same way."""
    read = request.method in READ_METHODS
    if not read:
        request[KIND_KEY] = "write"
        if request.path in ("/v2", "/v2/"):
            raise _read_only(request)
    # The path and its reference are checked before a write is refused, so a malformed
    # digest is 400 DIGEST_INVALID whatever the method (as the OCI conformance suite wants).
    path = parse_v2_path(request.raw_path.split("?", 1)[0])
    if read:
        request[KIND_KEY] = path.kind
    if path.kind == "base":
        return web.json_response({}, headers=API_HEADERS)
    by_tag = path.kind == "manifest" and not is_digest(path.reference)
    digest: Digest | None = None
    if by_tag:
        _check_manifest_tag(path.reference)
    elif path.kind != "tags":
        digest = Digest.parse(path.reference)
    if not read:
        raise _read_only(request)
    services = request.app[SERVICES]
    target = services.router.resolve(path.name, request.query.get("ns"))
    request[TARGET_KEY] = target
    # Policy before anything touches the cache or an upstream: tag rules apply only when a
    # tag is resolved; digests, blobs, tag lists and referrers follow the repository rule.
    enforce_policy(request, target, path.reference if by_tag else None)
    if path.kind == "manifest":  # the reference is valid: checked above
        ref = Reference(tag=path.reference) if digest is None else Reference(digest=digest)
        return await serve_manifest(request, target, ref)
    if path.kind == "blob":
        assert digest is not None
        return await serve_blob(request, target, digest)
    request[CACHE_KEY] = "relay"
    if path.kind == "tags":
        params = parse_page(request.query.get("n"), request.query.get("last"))
        relayed = await services.passthrough.tags(target, params)
    else:
        params = parse_artifact_type(request.query.get("artifactType"))
        assert digest is not None
        relayed = await services.passthrough.referrers(target, digest, params)
    return _relay(request, target, path, relayed, params)


def _read_only(request: web.Request) -> OCIError:
    return OCIError(ErrorCode.UNSUPPORTED, f"{request.method} is not supported: this mirror is "
                    "read-only", headers={"Allow": "GET, HEAD"})


def _check_manifest_tag(reference: str) -> None:
    """A manifest reference that is neither a tag nor a digest names no manifest: 404
    MANIFEST_UNKNOWN (what Distribution answers, and the OCI conformance suite expects for
    ``.INVALID_MANIFEST_NAME``), decided here without asking upstream."""
    try:
        validate_tag(reference)
    except OCIError as exc:
        raise OCIError(ErrorCode.MANIFEST_UNKNOWN, f"no manifest can be named {reference[:140]!r}: "
                       "it is neither a valid tag nor a digest", status=404) from exc


async def serve_manifest(request: web.Request, target: Target, ref: Reference, *,
                         ask_owner: bool = True) -> web.StreamResponse:
    """A manifest GET/HEAD; ``ask_owner`` False for a peer replica's request."""
    services = request.app[SERVICES]
    head = request.method == "HEAD"
    # Clients (containers/image, containerd) often send one Accept line per media type.
    accept = ", ".join(request.headers.getall("Accept", [])) or None
    res = await services.manifests.get(target, ref, accept, head=head, ask_owner=ask_owner)
    request[CACHE_KEY] = res.cache
    if not head:
        services.access.manifest(target.upstream, target.repository, ref.tag, res.digest)
    headers = {
        **API_HEADERS,
        "Content-Type": res.media_type,
        "Docker-Content-Digest": str(res.digest),
        "ETag": f'"{res.digest}"',
    }
    if res.warning:
        headers["Warning"] = res.warning
    if head or res.body is None:
        headers["Content-Length"] = str(res.size)
        return web.Response(status=200, headers=headers)
    return web.Response(status=200, body=res.body, headers=headers)


#: The first bytes of a big cached blob go out with an ordinary write, the rest with
#: sendfile. Linux grows a client's TCP receive buffer only after the client has read more
#: than that buffer within one measured round trip. When the whole body is queued in the
#: kernel at once by sendfile, a fast link never shows it such a round trip: the client's
#: buffer stays at its initial 128 KiB, the window below 96 KiB, and the blob arrives in
#: segments of half that, each ACKed and each waking the client. Measured with skopeo on
#: loopback (bench/skopeo_warm.py, bench/RESULTS-cold-path.md): up to 2.6x the segments and
#: 6-26% more client CPU than the same pull from Distribution, which writes its bodies. A written
#: lead, sent by the event loop as the socket drains, lets the buffer grow as it does with
#: a writing server (0.5% of a 200 MiB blob copied through user space; full-size segments
#: in 29 skopeo pulls of 32 with 1 MiB, 23 of 32 with 256 KiB).
SENDFILE_LEAD = 1 << 20
#: Bodies shorter than this go by sendfile alone: they are over before the client's buffer
#: matters, and small blobs (most of a pull's requests) skip the thread-pool read.
SENDFILE_LEAD_MIN = 16 << 20


class BlobFileResponse(web.FileResponse):
    """A cached blob sent with sendfile (Range handled by aiohttp); from
    ``SENDFILE_LEAD_MIN`` bytes on, after a written lead of ``SENDFILE_LEAD`` bytes.

    Its validator is its digest, like every blob response's: ``ETag: "<digest>"`` (from
    ``_blob_headers``), no ``Last-Modified``. Conditional requests are decided against that
    by :func:`serve_blob` before this response exists, so aiohttp's own (against its
    mtime-size ETag and the file's mtime) are skipped, and aiohttp's ETag and Last-Modified
    are never set. ``prepare`` is idempotent so the access-log middleware can send it and
    count its bytes.
    """

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self.prepared:
            return None
        return await super().prepare(request)

    def _make_response(self, request: web.BaseRequest, accept_encoding: str
                       ) -> tuple[_FileResponseResult, io.BufferedReader | None,
                                  os.stat_result, str | None]:
        """Open the blob (in an executor): no conditionals here (see the class), and a
        blob has no pre-compressed variants to choose from."""
        fobj = self._path.open("rb")
        return _FileResponseResult.SEND_FILE, fobj, os.stat(fobj.fileno()), None

    @property
    def etag(self) -> ETag | None:
        return super().etag

    @etag.setter
    def etag(self, value: ETag | str | None) -> None:
        """aiohttp sets its mtime-size ETag here; the digest ETag stays."""

    @property
    def last_modified(self) -> datetime.datetime | None:
        return None

    @last_modified.setter
    def last_modified(self, value: int | float | datetime.datetime | str | None) -> None:
        """aiohttp sets the file's mtime here; the digest is the blob's only validator."""

    async def _sendfile(self, request: web.BaseRequest, fobj: Any, offset: int,
                        count: int) -> AbstractStreamWriter:
        """aiohttp's sendfile (after the written lead), corked (full segments only, see
        :func:`corked`), counting the bytes sent even when the client goes away (the event
        loop leaves the file position after the last byte it sent)."""
        lead = SENDFILE_LEAD if count >= SENDFILE_LEAD_MIN else 0
        try:
            if lead:
                writer = await web.StreamResponse.prepare(self, request)
                assert writer is not None
                data = await asyncio.get_running_loop().run_in_executor(
                    None, os.pread, fobj.fileno(), lead, offset)
                await writer.write(data)
                count_sent(request, len(data))
            with corked(request.transport):
                writer = await super()._sendfile(request, fobj, offset + lead, count - lead)
        except BaseException:
            with contextlib.suppress(OSError, ValueError):
                count_sent(request, max(fobj.tell() - offset - lead, 0))
            raise
        count_sent(request, count - lead)
        return writer


def _blob_headers(digest: Digest) -> dict[str, str]:
    return {
        **API_HEADERS,
        "Docker-Content-Digest": str(digest),
        "Content-Type": "application/octet-stream",
        "Accept-Ranges": "bytes",
        "ETag": f'"{digest}"',
        "Cache-Control": "max-age=31536000, immutable",
    }


def _etag_in(etags: tuple[ETag, ...], digest: Digest, *, weak: bool) -> bool:
    """Whether a parsed If-Match/If-None-Match list names the blob's ETag (or is ``*``);
    a weak tag counts only in the ``weak`` comparison (RFC 9110 8.8.3.2)."""
    return any(tag.value in (ETAG_ANY, str(digest)) and (weak or not tag.is_weak)
               for tag in etags)


def _precondition(request: web.Request, digest: Digest) -> int | None:
    """What a blob request's preconditions decide against its ``ETag: "<digest>"`` (RFC 9110
    13.2.2, for GET and HEAD): 412 when If-Match does not name it, 304 when If-None-Match
    does, None to answer as usual. Blobs have no Last-Modified: the date conditions are
    ignored."""
    if_match = request.if_match
    if if_match is not None and not _etag_in(if_match, digest, weak=False):
        return 412
    if_none_match = request.if_none_match
    if if_none_match is not None and _etag_in(if_none_match, digest, weak=True):
        return 304
    return None


def _range_applies(request: web.Request, digest: Digest) -> bool:
    """If-Range (RFC 9110 13.1.5): a Range is honoured unless If-Range names another
    validator than the blob's ETag (strong comparison; a date never matches, since blobs have
    no Last-Modified). Then the whole blob is sent, 200."""
    if_range = request.headers.get("If-Range")
    return (if_range is None or "Range" not in request.headers
            or if_range.strip() == f'"{digest}"')


async def serve_blob(request: web.Request, target: Target, digest: Digest, *,
                     ask_owner: bool = True) -> web.StreamResponse:
    """A blob GET/HEAD for ``target``; ``ask_owner`` False for a peer replica's request (the
    cluster endpoint): it is answered here, never forwarded to another replica."""
    services = request.app[SERVICES]
    condition = _precondition(request, digest)
    if request.method == "HEAD" or condition is not None:
        # A conditional answer needs the blob to exist for this repository, not its bytes.
        info = await services.blobs.head(target, digest)
        request[CACHE_KEY] = info.cache
        headers = _blob_headers(digest)
        if condition == 304:  # validators and caching headers, no representation metadata
            del headers["Content-Type"], headers["Accept-Ranges"]
            return web.Response(status=304, headers=headers)
        if condition == 412:
            return web.Response(status=412, headers=API_HEADERS)
        if info.size is not None:
            headers["Content-Length"] = str(info.size)
        return web.Response(status=200, headers=headers)
    ranges = _range_applies(request, digest)
    source = await services.blobs.open(
        target, digest, request.headers.get("Range") if ranges else None, ask_owner=ask_owner)
    services.access.blob(target.upstream, target.repository, digest)
    request[CACHE_KEY] = source.cache
    resp: web.StreamResponse
    if isinstance(source, CachedBlob):
        if services.redirect is not None:
            url = await _presigned(services.redirect, digest)
            if url is not None:
                request[CACHE_KEY] = "redirect"
                return web.Response(status=307, headers={
                    **API_HEADERS, "Location": url, "Docker-Content-Digest": str(digest),
                    "Cache-Control": "no-store"})
        if source.path is not None and ranges:
            return BlobFileResponse(source.path, chunk_size=1 << 20,
                                    headers=_blob_headers(digest))
        # Not on local disk (object storage), or a Range to ignore (aiohttp's FileResponse
        # would apply it): streamed from the store's reader.
        resp = StoredBlobResponse(
            source.size, _blob_headers(digest),
            lambda offset, length: services.blobs.read(digest, offset, length), ranges=ranges)
    elif isinstance(source, InflightBlob):
        def remainder(start: int, end: int) -> AsyncGenerator[bytes]:
            request[CACHE_KEY] = "bypass"
            return services.blobs.remainder(target, digest, start, end)

        resp = InflightBlobResponse(source.download, _blob_headers(digest), remainder,
                                    ranges=ranges)
    else:
        return await _stream_passthrough(request, source)
    await resp.prepare(request)
    return resp


async def _presigned(redirect: Callable[[Digest], Awaitable[str]], digest: Digest
                     ) -> str | None:
    """The redirect URL, or None (serve the bytes ourselves) when it cannot be made."""
    try:
        return await redirect(digest)
    except StorageError as exc:
        log.warning("blob.redirect_failed", digest=str(digest), reason=str(exc))
        return None


async def _stream_passthrough(request: web.Request, source: PassthroughBlob
                              ) -> web.StreamResponse:
    """Storage is failing: relay upstream's body, uncached. The body is entered before
    anything is sent, so the upstream response is released on every path, a client gone
    before ``prepare`` included."""
    async with source.body as body:
        resp = web.StreamResponse(status=206 if body.partial else 200,
                                  headers=_blob_headers(source.digest))
        if body.length is not None:
            resp.content_length = body.length
        if body.content_range:
            resp.headers["Content-Range"] = body.content_range
        request[RESPONSE_KEY] = resp
        await resp.prepare(request)
        async with contextlib.aclosing(body.chunks(UPSTREAM_CHUNK)) as chunks:
            return await send_chunks(request, resp, chunks)


def _rewrite_link(link: str | None, target: Target, path: V2Path) -> str | None:
    """Point an upstream pagination Link back at the name the client used."""
    if not link:
        return None
    return link.replace(f"/v2/{target.repository}/", f"/v2/{path.name}/")


def _relay(request: web.Request, target: Target, path: V2Path, relayed: Relayed,
           params: dict[str, str]) -> web.StreamResponse:
    headers = dict(API_HEADERS)
    link = _rewrite_link(relayed.link, target, path)
    if path.kind == "tags":
        relayed, next_last = paginate_tags(relayed, params)
        if next_last is not None:
            link = f'</v2/{path.name}/tags/list?n={params["n"]}&last={next_last}>; rel="next"'
    if link:
        if "ns" in request.query and "ns=" not in link:
            link = link.replace(">", ("&" if "?" in link else "?") + f"ns={request.query['ns']}>",
                                1)
        headers["Link"] = link
    resp = web.Response(status=relayed.status, body=relayed.body, headers=headers)
    resp.headers["Content-Type"] = relayed.content_type
    if request.method == "HEAD":
        resp.body = None
        resp.headers["Content-Length"] = str(len(relayed.body))
    return resp


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the event loop answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: storage and metadata are usable. Degraded (503, with the reason) while
    storage fails (blobs bypass the cache) or a corrupt metadata store is being replaced; the
    mirror keeps serving meanwhile, and liveness (/healthz) stays up."""
    reason = await request.app[SERVICES].ready()
    if reason is None:
        return web.json_response({"status": "ok"})
    return web.json_response({"status": "degraded", "reason": reason}, status=503)


async def metrics(request: web.Request) -> web.Response:
    body = request.app[SERVICES].metrics.exposition()
    resp = web.Response(body=body)
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return resp


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_route("*", "/v2", v2)
    app.router.add_route("*", "/v2/{tail:.*}", v2)
