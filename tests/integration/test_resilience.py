"""Upstream faults: retries, stale-if-error, breaker, resume, corruption, storage failure."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from mirrorcache.api.services import SERVICES
from mirrorcache.oci.reference import Digest
from mirrorcache.storage.base import StorageError
from mirrorcache.storage.fs import FilesystemBlobStore, FsBlobWriter
from tests.support.countingproxy import CountingProxy, Fault
from tests.support.images import make_image, push_image
from tests.support.mirror import Mirror, mirror_config
from tests.support.registry import RegistryProcess
from tests.support.skopeo import copied_blob_digests, manifest_digest, skopeo_copy

pytestmark = pytest.mark.integration


@asynccontextmanager
async def mirror_via_proxy(tmp_path: Path, upstream_url: str, store: Any = None,
                           **upstream: Any) -> AsyncIterator[tuple[Mirror, CountingProxy]]:
    async with CountingProxy(upstream_url) as proxy:
        raw = mirror_config(tmp_path, {"docker.io": {"url": proxy.url, **upstream}})
        async with Mirror(raw, store=store) as mirror:
            yield mirror, proxy


async def get(url: str, **kw: Any) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as http, http.get(url, **kw) as resp:
        return resp.status, dict(resp.headers), await resp.read()


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def test_upstream_killed_after_warmup_serves_cache(tmp_path: Path) -> None:
    """The real registry process dies: every cached image still pulls with skopeo."""
    async with RegistryProcess(workdir=tmp_path / "reg") as reg:
        img = make_image([50_000, 8_000], media="oci")
        await push_image(reg.url, "team/app", img, "v1")
        async with mirror_via_proxy(tmp_path, reg.url, tag_ttl=0, max_retries=1,
                                    retry_max_wait=0.5, breaker_cooldown="200ms"
                                    ) as (mirror, proxy):
            warm = await skopeo_copy(f"docker://{mirror.host}/team/app:v1", tmp_path / "warm")
            assert manifest_digest(warm.dest_dir) == img.digest
            reg.kill()
            proxy.reset()
            with capture_logs() as logs:
                cold = await skopeo_copy(f"docker://{mirror.host}/team/app:v1",
                                         tmp_path / "down")
            assert manifest_digest(cold.dest_dir) == img.digest
            assert copied_blob_digests(cold.dest_dir) == set(img.blob_digests)
            assert any(e["event"] == "upstream.stale_served" for e in logs)
            status, headers, body = await get(f"{mirror.url}/v2/team/app/manifests/v1")
            assert status == 200 and sha(body) == img.digest
            assert "stale" in headers["Warning"]
            assert proxy.count(kind="blob") == 0  # digests never go upstream once cached
            # Uncached content while the upstream is down: a clear 503, not a hang.
            status, _, body = await get(f"{mirror.url}/v2/team/other/manifests/v1")
            assert status == 503 and b"UNAVAILABLE" in body

            await reg.arestart()
            img2 = make_image([1000], media="oci")
            await push_image(reg.url, "team/app", img2, "v1")
            proxy.reset()
            # Until the breaker's cooldown (200ms) runs out the cached tag is served stale;
            # then its probe finds the new content. Polled with a deadline, no fixed sleep.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while True:
                status, headers, body = await get(f"{mirror.url}/v2/team/app/manifests/v1")
                assert status == 200
                if sha(body) == img2.digest:
                    break
                assert sha(body) == img.digest and "stale" in headers["Warning"]
                assert loop.time() < deadline, "the breaker never let a probe through"
                await asyncio.sleep(0.05)


async def test_429_storm_served_from_cache_breaker_bounds_calls(
        tmp_path: Path, registry: RegistryProcess, unique_repo: str) -> None:
    img = make_image([4000], media="oci")
    await push_image(registry.url, unique_repo, img, "v1")
    async with mirror_via_proxy(tmp_path, registry.url, tag_ttl=0) as (mirror, proxy):
        status, _, _ = await get(f"{mirror.url}/v2/{unique_repo}/manifests/v1")
        assert status == 200
        proxy.reset()
        proxy.add_fault(Fault.status(429, {"Retry-After": "60"}, b"Too Many Requests",
                                     times=None))
        for _ in range(20):
            status, headers, body = await get(f"{mirror.url}/v2/{unique_repo}/manifests/v1")
            assert status == 200 and sha(body) == img.digest
            assert "Warning" in headers
        # One call met the 429; the breaker kept the other 19 away from the upstream.
        assert len(proxy.requests) == 1
        # Not cached anywhere: the client is told to back off, in OCI JSON.
        status, headers, body = await get(f"{mirror.url}/v2/{unique_repo}/manifests/v2")
        assert status == 429 and b"TOOMANYREQUESTS" in body
        assert 0 < int(headers["Retry-After"]) <= 60
        assert len(proxy.requests) == 1


async def test_plain_text_429_relayed_as_oci_error(
        tmp_path: Path, registry: RegistryProcess, unique_repo: str) -> None:
    async with mirror_via_proxy(tmp_path, registry.url) as (mirror, proxy):
        proxy.add_fault(Fault.status(429, {"Retry-After": "2"}, b"You have reached your pull "
                                     b"rate limit."))
        digest = "sha256:" + "ab" * 32
        status, headers, body = await get(f"{mirror.url}/v2/{unique_repo}/manifests/{digest}")
        assert status == 429
        assert b'"code": "TOOMANYREQUESTS"' in body and b"pull rate limit" in body
        assert headers["Retry-After"] == "2"


async def test_503_is_retried_with_backoff(tmp_path: Path, registry: RegistryProcess,
                                           unique_repo: str) -> None:
    img = make_image([70_000], media="oci", raw=True)
    await push_image(registry.url, unique_repo, img, "v1")
    layer = img.layers[0]
    async with mirror_via_proxy(tmp_path, registry.url, max_retries=3) as (mirror, proxy):
        proxy.add_fault(Fault.status(503, kind="blob", method="GET", times=2))
        status, _, body = await get(f"{mirror.url}/v2/{unique_repo}/blobs/{layer.digest}")
        assert status == 200 and body == layer.data
        assert proxy.count("GET", "blob") == 3


async def test_breaker_opens_and_fails_fast(tmp_path: Path, registry: RegistryProcess,
                                            unique_repo: str) -> None:
    async with mirror_via_proxy(tmp_path, registry.url, max_retries=0, breaker_failures=3,
                                breaker_cooldown="1h") as (mirror, proxy):
        proxy.add_fault(Fault.status(503, times=None))
        for i in range(3):  # three different paths: repeats of one path count once
            status, _, body = await get(f"{mirror.url}/v2/{unique_repo}/manifests/v{i}")
            assert status == 503
        assert len(proxy.requests) == 3
        for _ in range(10):
            status, headers, body = await get(f"{mirror.url}/v2/{unique_repo}/manifests/v1")
            assert status == 503 and b"UNAVAILABLE" in body
            assert int(headers["Retry-After"]) > 3000
        assert len(proxy.requests) == 3


async def test_silent_upstream_times_out(tmp_path: Path, registry: RegistryProcess,
                                         unique_repo: str) -> None:
    async with mirror_via_proxy(tmp_path, registry.url, read_timeout="300ms",
                                max_retries=0) as (mirror, proxy):
        proxy.add_fault(Fault.hang(30, times=None))
        loop = asyncio.get_running_loop()
        start = loop.time()
        status, _, body = await get(f"{mirror.url}/v2/{unique_repo}/manifests/v1")
        assert status == 503 and b"UNAVAILABLE" in body
        assert loop.time() - start < 5


async def test_connection_dropped_mid_blob_is_resumed(tmp_path: Path,
                                                      registry: RegistryProcess,
                                                      unique_repo: str) -> None:
    img = make_image([3_000_000], media="oci", raw=True)
    await push_image(registry.url, unique_repo, img, "v1")
    layer = img.layers[0]
    async with mirror_via_proxy(tmp_path, registry.url) as (mirror, proxy):
        proxy.add_fault(Fault.drop_after(1_000_000, kind="blob", method="GET"))
        status, _, body = await get(f"{mirror.url}/v2/{unique_repo}/blobs/{layer.digest}")
        assert status == 200 and sha(body) == layer.digest and len(body) == layer.size
        gets = proxy.matching(method="GET", kind="blob")
        assert len(gets) == 2
        assert gets[1].headers.get("Range", "").startswith("bytes=")
        assert 0 < int(gets[1].headers["Range"][6:].rstrip("-")) <= 1_000_000
        # Committed: the next pull is a hit.
        status, _, body = await get(f"{mirror.url}/v2/{unique_repo}/blobs/{layer.digest}")
        assert status == 200 and sha(body) == layer.digest
        assert proxy.count("GET", "blob") == 2


@pytest.mark.parametrize(("size", "offset"), [(500_000, 1234), (6_000_000, 5_900_000)])
async def test_corrupt_upstream_bytes_never_committed_or_served_complete(
        tmp_path: Path, registry: RegistryProcess, unique_repo: str, size: int,
        offset: int) -> None:
    img = make_image([size], media="oci", raw=True)
    await push_image(registry.url, unique_repo, img, "v1")
    layer = img.layers[0]
    async with mirror_via_proxy(tmp_path, registry.url) as (mirror, proxy):
        proxy.add_fault(Fault.corrupt(offset=offset, kind="blob", method="GET", times=None))
        url = f"{mirror.url}/v2/{unique_repo}/blobs/{layer.digest}"
        for _ in range(2):
            async with aiohttp.ClientSession() as http, http.get(url) as resp:
                if resp.status == 200:
                    # Bytes were already flowing: the connection is cut short.
                    with pytest.raises(aiohttp.ClientPayloadError):
                        await resp.read()
                else:
                    # Caught before the first byte: a clean OCI error.
                    assert size < 1_000_000 and resp.status == 502
                    assert (await resp.json())["errors"][0]["code"] == "DIGEST_INVALID"
            if size > 1_000_000:
                assert resp.status == 200  # the big one was streaming when the check failed
        assert proxy.count("GET", "blob") == 2  # nothing was cached between the attempts
        store = FilesystemBlobStore(tmp_path / "cache")
        assert await store.stat(Digest.parse(layer.digest)) is None
        assert list((tmp_path / "cache" / "tmp").glob("*.part")) == []
        proxy.faults.clear()
        status, _, body = await get(url)
        assert status == 200 and sha(body) == layer.digest


class FailingStore(FilesystemBlobStore):
    """A disk that is full: every write (manifests' too) fails."""

    def writer(self, digest: Digest) -> Any:
        @asynccontextmanager
        async def cm() -> AsyncIterator[FsBlobWriter]:
            raise StorageError("No space left on device")
            yield  # pragma: no cover

        return cm()


async def test_storage_failure_bypasses_cache(tmp_path: Path, registry: RegistryProcess,
                                              unique_repo: str) -> None:
    img = make_image([200_000, 3000], media="oci")
    await push_image(registry.url, unique_repo, img, "v1")
    store = FailingStore(tmp_path / "cache")
    async with mirror_via_proxy(tmp_path, registry.url, store=store) as (mirror, _proxy):
        with capture_logs() as logs:
            out = await skopeo_copy(f"docker://{mirror.host}/{unique_repo}:v1", tmp_path / "a")
        assert copied_blob_digests(out.dest_dir) == set(img.blob_digests)
        assert any(e["event"] == "storage.write_failed" for e in logs)
        assert any(e["event"] == "request.finished" and e["cache"] == "bypass" for e in logs)
        status, _, _ = await get(f"{mirror.url}/healthz")
        assert status == 200


async def test_offline_upstream_serves_only_cache(tmp_path: Path, registry: RegistryProcess,
                                                  unique_repo: str) -> None:
    img = make_image([9000], media="oci")
    await push_image(registry.url, unique_repo, img, "v1")
    async with mirror_via_proxy(tmp_path, registry.url) as (mirror, _):
        out = await skopeo_copy(f"docker://{mirror.host}/{unique_repo}:v1", tmp_path / "warm")
        assert manifest_digest(out.dest_dir) == img.digest
    async with mirror_via_proxy(tmp_path, registry.url, offline=True,
                                tag_ttl=0) as (mirror, proxy):
        out = await skopeo_copy(f"docker://{mirror.host}/{unique_repo}:v1", tmp_path / "off")
        assert copied_blob_digests(out.dest_dir) == set(img.blob_digests)
        status, _, body = await get(f"{mirror.url}/v2/{unique_repo}/manifests/other")
        assert status == 404 and b"MANIFEST_UNKNOWN" in body
        assert proxy.requests == []


async def test_stale_while_revalidate_answers_at_once(tmp_path: Path,
                                                      registry: RegistryProcess,
                                                      unique_repo: str) -> None:
    old, new = make_image([1000], media="oci"), make_image([1000], media="oci")
    await push_image(registry.url, unique_repo, old, "v1")
    async with mirror_via_proxy(tmp_path, registry.url, tag_ttl=0,
                                tag_stale_while_revalidate="1h") as (mirror, proxy):
        url = f"{mirror.url}/v2/{unique_repo}/manifests/v1"
        status, _, body = await get(url)
        assert sha(body) == old.digest
        await push_image(registry.url, unique_repo, new, "v1")
        proxy.reset()
        gate = asyncio.Event()
        proxy.add_fault(Fault.hold(gate, kind="manifest"))  # upstream answers when we say
        status, _, body = await get(url)
        # Answered from cache while the upstream still holds the revalidation: at once.
        assert status == 200 and sha(body) == old.digest
        assert not gate.is_set()
        gate.set()
        await mirror.app[SERVICES].manifests.wait_background()
        assert proxy.count("HEAD", "manifest") == 1
        status, _, body = await get(url)
        assert sha(body) == new.digest
