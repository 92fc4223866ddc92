"""The peer path against owners that misbehave or answer large: a fake owner that stalls
mid-body without closing (a partition), a manifest larger than one socket read, a signature
header that is not ASCII. The asker must give up in time and fetch upstream itself, take
whole bodies, and answer a malformed signature with OCI JSON."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from mirrorcache.cluster import hrw, signing
from mirrorcache.proxy.owners import blob_key, tag_key
from tests.support.countingproxy import CountingProxy
from tests.support.images import Image, Index, make_image, make_index, push_image
from tests.support.mirrorcluster import SECRET, MirrorCluster
from tests.support.mirrorproc import MirrorProcess
from tests.support.registry import RegistryProcess

pytestmark = pytest.mark.integration

ACCEPT = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class StallingOwner:
    """A fake replica: healthy, and for any peer blob request it sends the head and the
    first ``sent`` bytes of the blob, then neither sends more nor closes."""

    def __init__(self, blobs: dict[str, bytes], sent: int) -> None:
        self.blobs = blobs
        self.sent = sent
        self.asked: list[str] = []
        self.stalled = asyncio.Event()
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.host = ""

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        digest = request.match_info["digest"]
        self.asked.append(digest)
        data = self.blobs[digest]
        resp = web.StreamResponse(headers={"Docker-Content-Digest": digest,
                                           "Content-Type": "application/octet-stream"})
        resp.content_length = len(data)
        await resp.prepare(request)
        await resp.write(data[:self.sent])
        self.stalled.set()
        await self._release.wait()
        return resp

    async def __aenter__(self) -> StallingOwner:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/_mirrorcache/peer/v1/blobs/{digest}", self._blob)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.host = f"127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._release.set()
        assert self._runner is not None
        await self._runner.cleanup()


async def test_owner_stalling_mid_body_times_out_and_falls_back_to_upstream(
        tmp_path: Path, registry: RegistryProcess, unique_repo: str) -> None:
    """H1: the threaded receive of a peer body has a read timeout (peer_request_timeout)."""
    owner = StallingOwner({}, sent=256 * 1024)
    async with owner, CountingProxy(registry.url) as proxy:
        cluster = MirrorCluster(tmp_path / "c", proxy.url, n=1, peer_request_timeout="1s")
        r = cluster.replicas[0]
        members = [r.host, owner.host]
        cluster.write_configs(members)
        n = 0
        while True:  # a 4 MiB layer the fake owner owns
            image: Image = make_image([4 << 20], raw=True, seed=n)
            layer = image.layers[0]
            if hrw.owner(blob_key(layer.digest), members) == owner.host:
                break
            n += 1
        owner.blobs[layer.digest] = layer.data
        await push_image(registry.url, unique_repo, image, "v1")
        # One real replica and the fake: MirrorCluster's own start waits for n healthy.
        await r.start()
        try:
            await cluster.wait_healthy(count=2)
            await fetch_from_stalling_owner(r, cluster, owner, proxy, image, unique_repo)
        except BaseException:
            r.kill_all()
            raise
        await r.stop()


async def fetch_from_stalling_owner(r: MirrorProcess, cluster: MirrorCluster,
                                    owner: StallingOwner, proxy: CountingProxy,
                                    image: Image, unique_repo: str) -> None:
    layer = image.layers[0]
    async with aiohttp.ClientSession() as http:
        started = time.monotonic()

        async def get() -> tuple[int, str]:
            async with http.get(f"{r.url}/v2/{unique_repo}/blobs/{layer.digest}") as resp:
                return resp.status, sha(await resp.read())

        # Before the fix the thread's read had no timeout: the download hung for good.
        status, got = await asyncio.wait_for(get(), 20)
        took = time.monotonic() - started
        assert (status, got) == (200, layer.digest)
        assert owner.asked == [layer.digest] and owner.stalled.is_set()
        print(f"\nowner stalled after 256 KiB: served from upstream in {took:.2f} s")
        assert took < 10
        # One upstream GET: the Range resume after the bytes the owner sent.
        gets = [s for s in proxy.matching("GET", "blob") if s.path.endswith(layer.digest)]
        assert len(gets) == 1
        assert await cluster.metric(r, "mirrorcache_peer_fallbacks_total", kind="blob") == 1
        hexd = layer.digest.removeprefix("sha256:")
        stored = r.workdir / "cache" / "blobs" / "sha256" / hexd[:2] / hexd
        assert sha(stored.read_bytes()) == layer.digest
        fallback = r.events("cluster.peer_fallback")
        assert [e["reason"] for e in fallback] == ["broken"]
        # The replica's loop still serves (its socket was never made blocking): the blob
        # again, now from its own cache.
        assert await asyncio.wait_for(get(), 10) == (200, layer.digest)
        assert len([s for s in proxy.matching("GET", "blob")
                    if s.path.endswith(layer.digest)]) == 1
        assert owner.asked == [layer.digest]


def big_index(image: Image, size: int) -> Index:
    """An index over ``image`` padded by an annotation to more than ``size`` bytes."""
    small = make_index([image])
    doc = json.loads(small.manifest)
    doc["annotations"] = {"org.example.padding": "x" * size}
    return Index(manifest=json.dumps(doc, separators=(",", ":")).encode(),
                 media_type=small.media_type, manifests=small.manifests)


async def test_large_manifest_from_owner_is_read_whole_and_peer_requests_are_logged(
        tmp_path: Path, registry: RegistryProcess, unique_repo: str) -> None:
    """M4: a 3 MB index is read whole from the owner; L6: the owner's access log has the
    peer request (no signature); L1: a non-ASCII signature is 401 OCI JSON, not a 500."""
    index = big_index(make_image([2000], raw=True), 3_000_000)
    assert len(index.manifest) > 3_000_000
    await push_image(registry.url, unique_repo, index, "v1")
    async with CountingProxy(registry.url) as proxy, \
            MirrorCluster(tmp_path / "c", proxy.url, n=2) as cluster, \
            aiohttp.ClientSession() as http:
        owner = cluster.owner(tag_key("docker.io", unique_repo, "v1"))
        asker = next(r for r in cluster.replicas if r is not owner)
        for r in (asker, owner):
            async with http.get(f"{r.url}/v2/{unique_repo}/manifests/v1",
                                headers={"Accept": ACCEPT}) as resp:
                assert resp.status == 200
                assert sha(await resp.read()) == index.digest
        assert proxy.count("GET", "manifest") == 1
        for r in cluster.replicas:
            assert r.events("cluster.manifest_mismatch") == []
            assert await cluster.metric(r, "mirrorcache_peer_fallbacks_total") == 0
        assert await cluster.metric(asker, "mirrorcache_peer_requests_total",
                                    kind="manifest", result="ok") == 1
        # L6: the owner logged the peer request, without the signature.
        peer = [e for e in owner.events("request.finished") if e.get("route") == "peer"]
        assert len(peer) == 1 and peer[0]["status"] == 200
        assert peer[0]["path"] == "/_mirrorcache/peer/v1/manifests/v1"
        assert signing.SIGNATURE_HEADER.lower() not in owner.log_path.read_text().lower()

        # L1: a signature header with a byte that is not ASCII.
        path = (f"/_mirrorcache/peer/v1/manifests/v1?upstream=docker.io"
                f"&repository={unique_repo.replace('/', '%2F')}")
        good = signing.headers(SECRET, "GET", path, time.time())
        for name, value in ((signing.SIGNATURE_HEADER, b"\xff" * 64),
                            (signing.TIME_HEADER, "\u0661\u0662\u0663".encode())):
            headers = {**{k: v.encode() for k, v in good.items()}, name: value}
            reader, writer = await asyncio.open_connection("127.0.0.1", owner.port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {owner.host}\r\n".encode()
                         + b"".join(k.encode() + b": " + v + b"\r\n"
                                    for k, v in headers.items())
                         + b"Connection: close\r\n\r\n")
            await writer.drain()
            raw = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            head, _, body = raw.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 401"), head
            assert json.loads(body)["errors"][0]["code"] == "UNAUTHORIZED"
        log_text = owner.log_path.read_text()
        assert "Traceback" not in log_text
        assert good[signing.SIGNATURE_HEADER] not in log_text
