"""The peer client and probe against small in-process fake owners: read timeouts on the
threaded receive, the body closed after its block, signature headers checked as ASCII, and
a /healthz answer never read whole."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import structlog
from aiohttp import web

from mirrorcache.cluster import signing
from mirrorcache.cluster.client import OwnerFirst, PeerClient
from mirrorcache.cluster.membership import Membership
from mirrorcache.config import ClusterConfig
from mirrorcache.metrics import Metrics
from mirrorcache.oci.reference import Digest
from mirrorcache.proxy.routing import Target
from mirrorcache.upstream.registry import BlobBody

DATA = os.urandom(1 << 20)
DIGEST = Digest.parse("sha256:" + hashlib.sha256(DATA).hexdigest())


@asynccontextmanager
async def fake_owner(release: asyncio.Event) -> AsyncIterator[str]:
    """A replica answering a blob's head and first 64 KiB, then silent until ``release``;
    and a /healthz that answers 200 with an endless body."""

    async def blob(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = len(DATA)
        await resp.prepare(request)
        await resp.write(DATA[:1 << 16])
        await release.wait()
        return resp

    async def healthz(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()  # chunked, never ending
        await resp.prepare(request)
        await resp.write(b"x" * 8192)
        await release.wait()
        return resp

    app = web.Application()
    app.router.add_get("/_mirrorcache/peer/v1/blobs/{digest}", blob)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"127.0.0.1:{runner.addresses[0][1]}"
    finally:
        release.set()
        await runner.cleanup()


async def test_peer_blob_reads_time_out_and_the_body_is_closed() -> None:
    release = asyncio.Event()
    async with fake_owner(release) as host, aiohttp.ClientSession() as session:
        cfg = ClusterConfig(peers=("127.0.0.9:1", host), self_address="127.0.0.9:1",
                            secret="s" * 32, peer_request_timeout=0.5)
        client = PeerClient(Membership(cfg, session), session, Metrics())
        async with client.open_peer_blob(host, Target("docker.io", "library/x"),
                                         DIGEST) as body:
            raw = body.raw()
            assert raw is not None
            # H1: the thread's reads wait at most peer_request_timeout, never forever.
            assert raw._sock.gettimeout() == 0.5
            buf = memoryview(bytearray(1 << 20))
            got = await asyncio.wait_for(asyncio.to_thread(raw.recv_into, buf), 5)
            assert bytes(buf[:got]) == DATA[:got] and got == 1 << 16
            started = asyncio.get_running_loop().time()
            try:
                await asyncio.wait_for(asyncio.to_thread(raw.recv_into, buf), 5)
            except Exception as exc:
                assert type(exc).__name__ == "UpstreamBodyBroken"
                assert exc.reason == "SocketTimeoutError"  # type: ignore[attr-defined]
            else:
                raise AssertionError("a stalled owner's body did not time out")
            assert asyncio.get_running_loop().time() - started < 3
            # The loop's own socket stays non-blocking.
            sock = body._resp.connection.transport.get_extra_info(  # type: ignore[union-attr]
                "socket")
            assert sock.gettimeout() == 0.0
        # L3: the body is closed when its block exits: the taken-over socket too.
        assert raw._sock.fileno() == -1


async def test_a_body_without_read_timeout_is_never_taken_off_the_loop() -> None:
    release = asyncio.Event()
    async with fake_owner(release) as host, aiohttp.ClientSession() as session, \
            session.get(f"http://{host}/_mirrorcache/peer/v1/blobs/{DIGEST}") as resp:
        body = BlobBody("peer", DIGEST, resp, size=len(DATA), start=0, length=len(DATA),
                        partial=False)
        assert body.raw() is None  # the loop path: aiohttp's timeouts apply
        body.close()


def test_signature_headers_not_ascii_are_refused_not_raised() -> None:
    ts = "1700000000"
    good = signing.sign("s" * 32, "GET", "/p", int(ts))
    assert signing.verify("s" * 32, "GET", "/p", ts, good, 1700000000.0) is None
    bad_sig = "\udcff" * 64  # how aiohttp hands over a 0xff byte in a header
    assert signing.verify("s" * 32, "GET", "/p", ts, bad_sig, 1700000000.0) == "bad signature"
    assert signing.verify("s" * 32, "GET", "/p", ts, good.upper(), 1700000000.0) \
        == "bad signature"
    for stamp in ("\u0661\u0667" + "\u0660" * 8, " 1700000000", "1700000000\udcff", "-1", "1e9"):
        assert signing.verify("s" * 32, "GET", "/p", stamp, good, 1700000000.0) \
            == "bad timestamp", stamp


async def test_probe_does_not_read_an_endless_healthz_body() -> None:
    release = asyncio.Event()
    async with fake_owner(release) as host, aiohttp.ClientSession() as session:
        cfg = ClusterConfig(peers=("127.0.0.9:1", host), self_address="127.0.0.9:1",
                            secret="s" * 32, probe_interval=0.2)
        m = Membership(cfg, session)
        ok, error = await asyncio.wait_for(m.probe(host), 5)
        assert (ok, error) == (True, None)


class _Upstream:
    """Upstream for OwnerFirst's fallback: the whole blob, counted."""

    def __init__(self) -> None:
        self.opened = 0

    @asynccontextmanager
    async def open_blob(self, repo: str, digest: Digest, offset: int = 0,
                        end: int | None = None) -> AsyncIterator[str]:
        self.opened += 1
        yield "upstream body"


async def test_owner_refusal_cut_short_falls_back_to_upstream() -> None:
    """An owner whose 404 body breaks off (it died answering) did not answer: the asker
    fetches upstream (cluster.peer_fallback), it does not crash the download into a 500."""

    async def cut_404(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(status=404)
        resp.content_length = 10_000
        await resp.prepare(request)
        await resp.write(b'{"errors": [')
        assert request.transport is not None
        request.transport.close()
        return resp

    app = web.Application()
    app.router.add_get("/_mirrorcache/peer/v1/blobs/{digest}", cut_404)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host = f"127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with aiohttp.ClientSession() as session:
            cfg = ClusterConfig(peers=("127.0.0.9:1", host), self_address="127.0.0.9:1",
                                secret="s" * 32, peer_request_timeout=2.0)
            metrics = Metrics()
            client = PeerClient(Membership(cfg, session), session, metrics)
            upstream = _Upstream()
            source = OwnerFirst(client, host, Target("docker.io", "library/x"), upstream)
            with structlog.testing.capture_logs() as logs:
                async with source.open_blob("library/x", DIGEST) as body:
                    assert body == "upstream body"  # type: ignore[comparison-overlap]
            assert upstream.opened == 1
            assert source.owner_failed
            assert [e["event"] for e in logs] == ["cluster.peer_fallback"]
            assert metrics.peer_fallbacks.labels("blob")._value.get() == 1
    finally:
        await runner.cleanup()
