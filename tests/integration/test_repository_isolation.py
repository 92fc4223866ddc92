"""One repository rule for content by digest: cached, in flight, followed across workers, offline.

A repository is only handed a digest that is linked to it, that is being fetched for it, or
that upstream confirms (HEAD) for it first.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mirrorcache.api.services import SERVICES
from tests.support.countingproxy import CountingProxy, Fault
from tests.support.images import make_image, push_image
from tests.support.mirror import Mirror, mirror_config
from tests.support.registry import RegistryProcess
from tests.support.skopeo import copied_blob_digests, manifest_digest, skopeo_copy
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def fetch(http: aiohttp.ClientSession, url: str, method: str = "GET"
                ) -> tuple[int, bytes]:
    async with http.request(method, url) as resp:
        return resp.status, await resp.read()


async def _two_repos(registry: RegistryProcess, unique_repo: str, size: int = 2_000_000
                     ) -> tuple[str, str, bytes, str]:
    """A private repo holding a big layer and a public repo that does not hold it."""
    private, public = f"{unique_repo}/private", f"{unique_repo}/public"
    secret = make_image([size], media="oci", raw=True)
    await push_image(registry.url, private, secret, "v1")
    await push_image(registry.url, public, make_image([1000], media="oci"), "v1")
    layer = secret.layers[0]
    return private, public, layer.data, layer.digest


def _error_code(body: bytes) -> str:
    import json
    return str(json.loads(body)["errors"][0]["code"])


async def test_inflight_blob_not_served_to_another_repository(
        tmp_path: Path, registry: RegistryProcess, unique_repo: str) -> None:
    private, public, data, digest = await _two_repos(registry, unique_repo)
    async with CountingProxy(registry.url, chunk_size=16384) as proxy:
        # A slow body keeps the private blob in flight while the public repository asks.
        proxy.add_fault(Fault.slow(0.01, kind="blob", method="GET", times=None))
        async with Mirror(mirror_config(tmp_path, {"docker.io": {"url": proxy.url}})) as m:
            blobs = m.app[SERVICES].blobs
            async with aiohttp.ClientSession() as http:
                leader = asyncio.ensure_future(fetch(http, f"{m.url}/v2/{private}/blobs/{digest}"))
                await wait_until(lambda: blobs.inflight == 1)
                status, body = await fetch(http, f"{m.url}/v2/{public}/blobs/{digest}")
                assert status == 404 and _error_code(body) == "BLOB_UNKNOWN"
                assert data[:1000] not in body
                status, body = await fetch(http, f"{m.url}/v2/{public}/blobs/{digest}", "HEAD")
                assert status == 404 and body == b""
                assert blobs.inflight == 1  # both answers came while the blob was in flight
                assert await leader == (200, data)
            # The private repository's own fetch: one GET, never a confirming HEAD for it.
            assert proxy.count("GET", "blob", repo=private) == 1
            assert proxy.count("HEAD", "blob", repo=private) == 0
            # Upstream was asked for the public repository each time, and said no.
            assert proxy.count("HEAD", "blob", repo=public) == 2
            assert proxy.count("GET", "blob", repo=public) == 0


async def test_peer_process_fetch_not_followed_for_another_repository(
        tmp_path: Path, registry: RegistryProcess, unique_repo: str) -> None:
    """Two apps on one cache directory behave as two workers: the claim-file path too."""
    private, public, data, digest = await _two_repos(registry, unique_repo)
    async with CountingProxy(registry.url, chunk_size=16384) as proxy:
        proxy.add_fault(Fault.slow(0.01, kind="blob", method="GET", times=None))
        raw = mirror_config(tmp_path, {"docker.io": {"url": proxy.url}})
        async with Mirror(raw) as one, Mirror(raw) as two:
            async with aiohttp.ClientSession() as http:
                leader = asyncio.ensure_future(
                    fetch(http, f"{one.url}/v2/{private}/blobs/{digest}"))
                await wait_until(lambda: one.app[SERVICES].blobs.inflight == 1
                            and proxy.count("GET", "blob") == 1)
                status, body = await fetch(http, f"{two.url}/v2/{public}/blobs/{digest}")
                assert status == 404 and _error_code(body) == "BLOB_UNKNOWN"
                assert one.app[SERVICES].blobs.inflight == 1
                # The same repository through the other worker follows the fetch: no HEAD.
                follower = await fetch(http, f"{two.url}/v2/{private}/blobs/{digest}")
                assert follower == (200, data)
                assert await leader == (200, data)
            assert proxy.count("GET", "blob") == 1
            assert proxy.count("HEAD", "blob", repo=private) == 0
            assert proxy.count("HEAD", "blob", repo=public) == 1


async def test_manifest_by_digest_not_served_to_another_repository(
        tmp_path: Path, registry: RegistryProcess, unique_repo: str) -> None:
    private, public = f"{unique_repo}/private", f"{unique_repo}/public"
    img = make_image([3000], media="oci")
    await push_image(registry.url, private, img, "v1")
    await push_image(registry.url, public, make_image([1000], media="oci"), "v1")
    async with CountingProxy(registry.url) as proxy:
        proxy.add_fault(Fault.hang(0.5, kind="manifest", method="GET"))
        async with Mirror(mirror_config(tmp_path, {"docker.io": {"url": proxy.url}})) as m:
            async with aiohttp.ClientSession() as http:
                leader = asyncio.ensure_future(
                    fetch(http, f"{m.url}/v2/{private}/manifests/{img.digest}"))
                await wait_until(lambda: proxy.count("GET", "manifest") == 1)
                status, body = await fetch(http, f"{m.url}/v2/{public}/manifests/{img.digest}")
                assert status == 404 and _error_code(body) == "MANIFEST_UNKNOWN"
                status, body = await leader
                assert status == 200 and sha(body) == img.digest
                # Cached now: still not for the public repository.
                status, body = await fetch(http, f"{m.url}/v2/{public}/manifests/{img.digest}")
                assert status == 404 and _error_code(body) == "MANIFEST_UNKNOWN"
            assert proxy.count("GET", "manifest", repo=private) == 1
            assert proxy.count("HEAD", "manifest", repo=private) == 0
            assert proxy.count("GET", "manifest", repo=public) <= 1


async def test_offline_serves_only_content_linked_to_the_repository(
        tmp_path: Path, registry: RegistryProcess, unique_repo: str) -> None:
    private, public = f"{unique_repo}/private", f"{unique_repo}/public"
    img = make_image([9000], media="oci")
    await push_image(registry.url, private, img, "v1")
    async with CountingProxy(registry.url) as proxy:
        raw = mirror_config(tmp_path, {"docker.io": {"url": proxy.url}})
        async with Mirror(raw):
            pass
        async with Mirror(raw) as m:
            out = await skopeo_copy(f"docker://{m.host}/{private}:v1", tmp_path / "warm")
            assert manifest_digest(out.dest_dir) == img.digest
        proxy.reset()
        raw = mirror_config(tmp_path, {"docker.io": {"url": proxy.url, "offline": True}})
        async with Mirror(raw) as m, aiohttp.ClientSession() as http:
            layer = img.layers[0]
            status, body = await fetch(http, f"{m.url}/v2/{public}/blobs/{layer.digest}")
            assert status == 404 and _error_code(body) == "BLOB_UNKNOWN"
            status, _ = await fetch(http, f"{m.url}/v2/{public}/blobs/{layer.digest}", "HEAD")
            assert status == 404
            status, body = await fetch(http, f"{m.url}/v2/{public}/manifests/{img.digest}")
            assert status == 404 and _error_code(body) == "MANIFEST_UNKNOWN"
            # The repository that pulled it still gets everything, offline.
            status, body = await fetch(http, f"{m.url}/v2/{private}/blobs/{layer.digest}")
            assert status == 200 and body == layer.data
            status, body = await fetch(http, f"{m.url}/v2/{private}/manifests/{img.digest}")
            assert status == 200 and sha(body) == img.digest
        assert proxy.requests == []


async def test_concurrent_cold_pulls_make_no_blob_head(
        tmp_path: Path, registry: RegistryProcess, unique_repo: str) -> None:
    """A repository's own blobs never need upstream's confirmation, even while another pull
    of the same image is committing them."""
    img = make_image([300_000, 200_000, 100_000, 5000], media="oci")
    await push_image(registry.url, unique_repo, img, "v1")
    async with CountingProxy(registry.url, chunk_size=16384) as proxy:
        proxy.add_fault(Fault.slow(0.002, kind="blob", method="GET", times=None))
        async with Mirror(mirror_config(tmp_path, {"docker.io": {"url": proxy.url}})) as m:
            outs = await asyncio.gather(*(
                skopeo_copy(f"docker://{m.host}/{unique_repo}:v1", tmp_path / f"c{i}")
                for i in range(4)))
            async with aiohttp.ClientSession() as http:
                late = await asyncio.gather(*(
                    fetch(http, f"{m.url}/v2/{unique_repo}/blobs/{b.digest}")
                    for b in img.blobs))
        for out in outs:
            assert copied_blob_digests(out.dest_dir) == set(img.blob_digests)
        assert [(s, sha(body)) for s, body in late] == [(200, b.digest) for b in img.blobs]
        assert proxy.count("HEAD", "blob") == 0
        assert proxy.count("GET", "blob") == len(img.blobs)


def _coalesced(m: Mirror, kind: str) -> float:
    return m.app[SERVICES].metrics.registry.get_sample_value(
        "mirrorcache_coalesced_requests_total", {"kind": kind}) or 0.0


async def test_failed_fetch_for_another_repository_does_not_fail_the_joiner(
        tmp_path: Path, registry: RegistryProcess, unique_repo: str) -> None:
    """A request for a repository that does not hold the blob starts its fetch; a legitimate
    pull of the blob joins it (upstream confirmed it by HEAD). Upstream's 404 for the first
    repository is not the joiner's answer: it fetches for its own repository."""
    private, public, data, digest = await _two_repos(registry, unique_repo)
    gate = asyncio.Event()
    async with CountingProxy(registry.url) as proxy:
        proxy.add_fault(Fault.hold(gate, kind="blob", method="GET", path=f"/{public}/"))
        async with Mirror(mirror_config(tmp_path, {"docker.io": {"url": proxy.url}})) as m:
            async with aiohttp.ClientSession() as http:
                bogus = asyncio.ensure_future(fetch(http, f"{m.url}/v2/{public}/blobs/{digest}"))
                await wait_until(lambda: proxy.count("GET", "blob", repo=public) == 1)
                legit = asyncio.ensure_future(
                    fetch(http, f"{m.url}/v2/{private}/blobs/{digest}"))
                await wait_until(lambda: _coalesced(m, "blob") == 1)
                gate.set()
                status, body = await bogus
                assert status == 404 and _error_code(body) == "BLOB_UNKNOWN"
                assert await legit == (200, data)
        assert proxy.count("HEAD", "blob", repo=private) == 1  # the join's confirmation
        assert proxy.count("GET", "blob", repo=private) == 1
        assert proxy.count("GET", "blob", repo=public) == 1


async def test_peer_fetch_failed_for_another_repository_is_taken_over(
        tmp_path: Path, registry: RegistryProcess, unique_repo: str) -> None:
    """The same across worker processes (two apps on one cache directory). A follower can
    find the failed claim's error (it opened the claim file before it was removed); here
    worker one's claim is released without removing the file, so the follower always does."""
    private, public, data, digest = await _two_repos(registry, unique_repo)
    gate = asyncio.Event()

    class LingeringClaim:
        def __init__(self, claim: Any) -> None:
            self.claim = claim

        def __getattr__(self, name: str) -> Any:
            return getattr(self.claim, name)

        def release(self, *, done: bool) -> None:
            os.close(self.claim._fd)  # the lock is free; the file, with its error, stays

    class LingeringClaims:
        def __init__(self, claims: Any) -> None:
            self.claims = claims

        def __getattr__(self, name: str) -> Any:
            return getattr(self.claims, name)

        def claim(self, key: str) -> Any:
            claim = self.claims.claim(key)
            return None if claim is None else LingeringClaim(claim)

    async with CountingProxy(registry.url) as proxy:
        proxy.add_fault(Fault.hold(gate, kind="blob", method="GET", path=f"/{public}/"))
        raw = mirror_config(tmp_path, {"docker.io": {"url": proxy.url}})
        async with Mirror(raw) as one, Mirror(raw) as two:
            blobs_one = one.app[SERVICES].blobs
            blobs_one._claims = LingeringClaims(blobs_one._claims)
            async with aiohttp.ClientSession() as http:
                bogus = asyncio.ensure_future(
                    fetch(http, f"{one.url}/v2/{public}/blobs/{digest}"))
                await wait_until(lambda: proxy.count("GET", "blob", repo=public) == 1)
                legit = asyncio.ensure_future(
                    fetch(http, f"{two.url}/v2/{private}/blobs/{digest}"))
                await wait_until(lambda: _coalesced(two, "blob_peer") == 1)
                gate.set()
                status, body = await bogus
                assert status == 404 and _error_code(body) == "BLOB_UNKNOWN"
                assert await legit == (200, data)
        assert proxy.count("GET", "blob", repo=private) == 1
        assert proxy.count("GET", "blob", repo=public) == 1
