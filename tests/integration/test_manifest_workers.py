"""Manifests coalesce across worker processes the way blobs do: two apps on one cache
directory (two workers) and concurrent clients pulling one image fetch each manifest once
(FetchClaims claim files); the waiting worker takes over when the fetching one gives up."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from mirrorcache.api.services import SERVICES
from tests.support.countingproxy import CountingProxy, Fault
from tests.support.images import make_multiarch, push_image
from tests.support.mirror import Mirror, mirror_config
from tests.support.registry import RegistryProcess
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration


def peer_follows(*mirrors: Mirror) -> float:
    """Manifest fetches a worker waited for another worker to do."""
    return sum(m.app[SERVICES].metrics.registry.get_sample_value(
        "mirrorcache_coalesced_requests_total", {"kind": "manifest_peer"}) or 0.0
        for m in mirrors)


async def fetch(http: aiohttp.ClientSession, url: str) -> tuple[int, bytes]:
    async with http.get(url, headers={"Accept": "application/vnd.oci.image.index.v1+json, "
                                      "application/vnd.oci.image.manifest.v1+json"}) as resp:
        return resp.status, await resp.read()


async def test_concurrent_pulls_on_two_workers_fetch_each_manifest_once(
        tmp_path: Path, registry: RegistryProcess, unique_repo: str) -> None:
    index = make_multiarch([2000], media="oci")
    await push_image(registry.url, unique_repo, index, "v1")
    async with CountingProxy(registry.url) as proxy:
        raw = mirror_config(tmp_path, {"docker.io": {"url": proxy.url}})
        async with Mirror(raw) as one, Mirror(raw) as two, aiohttp.ClientSession() as http:
            # Every manifest GET waits at the upstream until the other worker is waiting too.
            gate = asyncio.Event()
            proxy.add_fault(Fault.hold(gate, method="GET", kind="manifest", times=None))
            tag = [asyncio.ensure_future(fetch(http, f"{m.url}/v2/{unique_repo}/manifests/v1"))
                   for m in (one, two, one, two)]
            await wait_until(lambda: proxy.count("GET", "manifest") >= 1
                        and peer_follows(one, two) >= 1)
            gate.set()
            assert await asyncio.gather(*tag) == [(200, index.manifest)] * 4
            assert proxy.count("HEAD", "manifest") == 1  # one revalidation of the tag
            assert proxy.count("GET", "manifest") == 1
            # Then every client asks for every child manifest at once, on both workers.
            gate.clear()
            children = [asyncio.ensure_future(
                fetch(http, f"{m.url}/v2/{unique_repo}/manifests/{child.digest}"))
                for child in index.manifests for m in (one, two, two)]
            await wait_until(lambda: proxy.count("GET", "manifest") >= 2
                        and peer_follows(one, two) >= 1 + len(index.manifests))
            gate.set()
            got = await asyncio.gather(*children)
            assert got == [(200, child.manifest) for child in index.manifests for _ in range(3)]
            for child in index.manifests:
                assert len([s for s in proxy.matching("GET", "manifest")
                            if s.path.endswith(child.digest)]) == 1
            assert proxy.count("GET", "manifest") == 1 + len(index.manifests)
            assert list((tmp_path / "cache" / "tmp").glob("*.lock")) == []


async def test_waiting_worker_takes_over_when_the_fetching_one_fails(
        tmp_path: Path, registry: RegistryProcess, unique_repo: str) -> None:
    index = make_multiarch([2000], media="oci", arches=("amd64",))
    child = index.manifests[0]
    await push_image(registry.url, unique_repo, index, "v1")
    async with CountingProxy(registry.url) as proxy:
        gate = asyncio.Event()
        proxy.add_fault(Fault.hold(gate, method="GET", kind="manifest"))  # the first GET only
        # Worker one gives up on upstream after 2 s; worker two would wait a minute.
        impatient = {"url": proxy.url, "request_timeout": 2.0, "read_timeout": 2.0,
                     "max_retries": 0}
        raw_one = mirror_config(tmp_path, {"docker.io": impatient})
        raw_two = mirror_config(tmp_path, {"docker.io": {"url": proxy.url}})
        async with Mirror(raw_one) as one, Mirror(raw_two) as two, \
                aiohttp.ClientSession() as http:
            url = f"/v2/{unique_repo}/manifests/{child.digest}"
            first = asyncio.ensure_future(fetch(http, one.url + url))
            await wait_until(lambda: proxy.count("GET", "manifest") == 1)
            second = asyncio.ensure_future(fetch(http, two.url + url))
            await wait_until(lambda: peer_follows(two) == 1)
            status, _ = await first
            assert status in (502, 503, 504)
            # Worker two was waiting for worker one's fetch, then fetched it itself.
            assert await second == (200, child.manifest)
            assert proxy.count("GET", "manifest") == 2  # the failed fetch, then the takeover
            gate.set()  # let the abandoned upstream request go
