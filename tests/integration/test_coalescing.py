"""One upstream fetch per blob, streamed to every waiting client, across worker processes."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import aiohttp
import pytest

from mirrorcache.api.services import SERVICES
from tests.support.countingproxy import CountingProxy, Fault
from tests.support.images import make_image, push_image
from tests.support.mirror import Mirror, mirror_config
from tests.support.mirrorproc import MirrorProcess
from tests.support.registry import RegistryProcess
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def fetch(http: aiohttp.ClientSession, url: str, **kw: object) -> tuple[int, bytes]:
    async with http.get(url, **kw) as resp:  # type: ignore[arg-type]
        return resp.status, await resp.read()


async def test_20_concurrent_cold_gets_one_upstream_fetch(
        tmp_path: Path, registry: RegistryProcess, unique_repo: str) -> None:
    img = make_image([4_000_000], media="oci", raw=True)
    await push_image(registry.url, unique_repo, img, "v1")
    layer = img.layers[0]
    async with CountingProxy(registry.url) as proxy:
        # Slow the upstream body so every client joins while the fetch is in flight.
        proxy.add_fault(Fault.hang(0.3, kind="blob", method="GET"))
        async with Mirror(mirror_config(tmp_path, {"docker.io": {"url": proxy.url}})) as m:
            url = f"{m.url}/v2/{unique_repo}/blobs/{layer.digest}"
            async with aiohttp.ClientSession() as http:
                results = await asyncio.gather(*(fetch(http, url) for _ in range(20)))
            assert [s for s, _ in results] == [200] * 20
            assert all(body == layer.data for _, body in results)
            assert proxy.count("GET", "blob") == 1
            assert proxy.count(kind="blob") == 1


async def test_manifest_tag_requests_coalesce(tmp_path: Path, registry: RegistryProcess,
                                              unique_repo: str) -> None:
    img = make_image([1000], media="oci")
    await push_image(registry.url, unique_repo, img, "v1")
    async with CountingProxy(registry.url) as proxy:
        proxy.add_fault(Fault.hang(0.2, kind="manifest"))
        async with Mirror(mirror_config(tmp_path, {"docker.io": {"url": proxy.url}})) as m:
            url = f"{m.url}/v2/{unique_repo}/manifests/v1"
            async with aiohttp.ClientSession() as http:
                results = await asyncio.gather(*(fetch(http, url) for _ in range(15)))
            assert all(s == 200 and sha(b) == img.digest for s, b in results)
            assert proxy.count("HEAD", "manifest") == 1
            assert proxy.count("GET", "manifest") == 1


async def test_follower_mid_download_range_and_cancelled_leader(
        tmp_path: Path, registry: RegistryProcess, unique_repo: str) -> None:
    img = make_image([6_000_000], media="oci", raw=True)
    await push_image(registry.url, unique_repo, img, "v1")
    layer = img.layers[0]
    data = layer.data
    async with CountingProxy(registry.url, chunk_size=16384) as proxy:
        async with Mirror(mirror_config(tmp_path, {"docker.io": {"url": proxy.url}})) as m:
            blobs = m.app[SERVICES].blobs
            url = f"{m.url}/v2/{unique_repo}/blobs/{layer.digest}"
            async with aiohttp.ClientSession() as http:
                # The leader reads a little, then goes away (client disconnect).
                leader = await http.get(url)
                first = await leader.content.readexactly(100_000)
                assert first == data[:100_000]
                assert blobs.inflight == 1
                leader.close()
                # A follower joining mid-download gets the complete body, and a ranged
                # read of the in-flight blob gets exactly its bytes.
                full, ranged = await asyncio.gather(
                    fetch(http, url),
                    fetch(http, url, headers={"Range": "bytes=5000000-5000999"}),
                )
            assert full == (200, data)
            assert ranged == (206, data[5_000_000:5_001_000])
            assert proxy.count("GET", "blob") == 1


@pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])
async def test_coalescing_across_two_worker_processes(
        tmp_path: Path, registry: RegistryProcess, unique_repo: str, event_loop: str) -> None:
    """With asyncio, in-flight bytes go out with sendfile; uvloop has none (read+write)."""
    if event_loop == "uvloop":
        pytest.importorskip("uvloop", reason="the uvloop case needs the speed extra")
    img = make_image([8_000_000], media="oci", raw=True)
    await push_image(registry.url, unique_repo, img, "v1")
    layer = img.layers[0]
    gate = asyncio.Event()
    async with CountingProxy(registry.url) as proxy:
        # The upstream body is held until the other worker is seen following the fetch, so
        # the test does not depend on how fast each worker gets its connections.
        proxy.add_fault(Fault.hold(gate, kind="blob", method="GET"))
        raw = mirror_config(tmp_path, {"docker.io": {"url": proxy.url}}, event_loop=event_loop)
        async with MirrorProcess(raw, tmp_path / "proc", workers=2) as m:
            url = f"{m.url}/v2/{unique_repo}/blobs/{layer.digest}"
            # Separate connections, so the kernel spreads them over both workers.
            results = []
            for batch in range(2):
                async with aiohttp.ClientSession(
                        connector=aiohttp.TCPConnector(force_close=True)) as http:
                    pulls = asyncio.gather(*(fetch(http, url) for _ in range(10)))
                    if batch == 0:
                        await wait_until(lambda: m.events("blob.following_peer"), timeout=30,
                                         what="the second worker following the fetch")
                        gate.set()
                    results += await pulls
                if batch == 0:
                    assert proxy.count("GET", "blob") == 1
            assert all(s == 200 and b == layer.data for s, b in results)
            assert proxy.count("GET", "blob") == 1
            workers = {e.get("worker") for e in m.events("request.finished")}
            assert workers == {0, 1}
            # Each worker reports the loop it really runs on (no silent fallback).
            assert [e["event_loop"] for e in m.events("app.started")] == [event_loop] * 2
            assert m.events("blob.following_peer")
