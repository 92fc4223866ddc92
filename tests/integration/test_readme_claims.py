"""README claims, each proved against real parts and counted at the upstream.

Cross-repository confirmation, the rate-limit metric, the breaker's single half-open probe,
revalidation by HEAD only, resume giving up, caching resuming after a storage bypass,
/readyz on unwritable storage, and sendfile for cached blobs.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from mirrorcache.config import parse_config
from mirrorcache.errors import OCIError
from mirrorcache.metrics import Metrics
from mirrorcache.oci.reference import Digest
from mirrorcache.proxy import blobs as blobs_module
from mirrorcache.storage.base import StorageError
from mirrorcache.storage.fs import FilesystemBlobStore, FsBlobWriter
from mirrorcache.upstream.breaker import CircuitBreaker
from mirrorcache.upstream.client import UpstreamClient, UpstreamRejected
from tests.support.countingproxy import CountingProxy, Fault
from tests.support.images import make_image, push_image
from tests.support.mirror import Mirror, mirror_config
from tests.support.registry import RegistryProcess
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

OCI = "application/vnd.oci.image.manifest.v1+json"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@asynccontextmanager
async def mirror_via_proxy(tmp_path: Path, upstream_url: str, *, store: Any = None,
                           app_kw: dict[str, Any] | None = None, **upstream: Any
                           ) -> AsyncIterator[tuple[Mirror, CountingProxy]]:
    async with CountingProxy(upstream_url) as proxy:
        raw = mirror_config(tmp_path, {"docker.io": {"url": proxy.url, **upstream}})
        async with Mirror(raw, store=store, **(app_kw or {})) as mirror:
            yield mirror, proxy


async def get(url: str, method: str = "GET", **kw: Any) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as http, http.request(method, url, **kw) as resp:
        return resp.status, dict(resp.headers), await resp.read()


async def test_cross_repository_blob_confirmed_by_one_head(
        tmp_path: Path, registry: RegistryProcess, unique_repo: str) -> None:
    img = make_image([70_000], media="oci", raw=True)
    layer = img.layers[0]
    other = f"{unique_repo}-b"
    await push_image(registry.url, unique_repo, img, "v1")
    await push_image(registry.url, other, img, "v1")
    async with mirror_via_proxy(tmp_path, registry.url) as (mirror, proxy):
        status, _, body = await get(f"{mirror.url}/v2/{unique_repo}/blobs/{layer.digest}")
        assert status == 200 and body == layer.data
        assert proxy.count("GET", "blob") == 1
        proxy.reset()
        for _ in range(2):  # confirmed once, then linked: the second asks nothing
            status, _, body = await get(f"{mirror.url}/v2/{other}/blobs/{layer.digest}")
            assert status == 200 and body == layer.data
        assert [(s.method, s.repo) for s in proxy.requests if s.kind == "blob"] == [
            ("HEAD", other)]


async def test_ratelimit_remaining_header_becomes_a_metric(tmp_path: Path) -> None:
    """An upstream sending Docker Hub's rate-limit headers: /metrics shows what remains."""
    async def answer(request: web.Request) -> web.Response:
        return web.json_response(
            {"errors": [{"code": "MANIFEST_UNKNOWN", "message": "no"}]}, status=404,
            headers={"ratelimit-limit": "100;w=21600", "ratelimit-remaining": "97;w=21600"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with mirror_via_proxy(tmp_path, f"http://127.0.0.1:{port}") as (mirror, proxy):
            status, _, _ = await get(f"{mirror.url}/v2/library/x/manifests/v1")
            assert status == 404
            assert proxy.count("HEAD", "manifest") == 1
            _, _, metrics = await get(f"{mirror.url}/metrics")
    finally:
        await runner.cleanup()
    assert b'mirrorcache_upstream_ratelimit_remaining{upstream="docker.io"} 97.0' in metrics


async def test_breaker_lets_one_half_open_probe_through(
        tmp_path: Path, registry: RegistryProcess, unique_repo: str) -> None:
    """After the cooldown (an injected clock, no waiting), ten concurrent calls: exactly one
    reaches the upstream; the others fail fast while it is out."""
    img = make_image([1000], media="oci")
    await push_image(registry.url, unique_repo, img, "v1")
    now = [1000.0]
    cfg = parse_config(mirror_config(tmp_path, {"docker.io": {
        "url": registry.url, "max_retries": 0, "breaker_failures": 1,
        "breaker_cooldown": "30s"}})).upstreams["docker.io"]
    async with CountingProxy(registry.url) as proxy, aiohttp.ClientSession() as session:
        client = UpstreamClient(replace_url(cfg, proxy.url), session, Metrics())
        client.breaker = CircuitBreaker("docker.io", 1, 30.0, clock=lambda: now[0])
        path = f"/v2/{unique_repo}/manifests/v1"
        proxy.add_fault(Fault.status(503, kind="manifest"))
        try:
            async with client.open("HEAD", path, unique_repo) as resp:
                first = resp.status
        except OCIError as exc:
            first = exc.status
        assert first == 503
        assert client.breaker.is_open and proxy.count() == 1
        with pytest.raises(UpstreamRejected):
            async with client.open("HEAD", path, unique_repo):
                pass
        assert proxy.count() == 1  # open: nothing reaches upstream
        now[0] += 31  # the cooldown is over
        gate = asyncio.Event()
        proxy.add_fault(Fault.hold(gate, kind="manifest"))

        async def call() -> int | str:
            try:
                async with client.open("HEAD", path, unique_repo, {"Accept": OCI}) as resp:
                    return resp.status
            except UpstreamRejected:
                return "rejected"

        calls = [asyncio.ensure_future(call()) for _ in range(10)]
        # Nine fail fast while the single probe is held at the upstream.
        await wait_until(lambda: sum(t.done() for t in calls) >= 9, what="nine rejections")
        await wait_until(lambda: proxy.count() == 2, what="the probe at the upstream")
        assert [t.result() for t in calls if t.done()] == ["rejected"] * 9
        gate.set()
        results = await asyncio.gather(*calls)
        assert sorted(map(str, results)) == ["200"] + ["rejected"] * 9
        assert not client.breaker.is_open and proxy.count() == 2


def replace_url(cfg: Any, url: str) -> Any:
    import dataclasses

    return dataclasses.replace(cfg, url=url)


async def test_tag_past_ttl_unchanged_costs_one_head_and_no_get(
        tmp_path: Path, registry: RegistryProcess, unique_repo: str) -> None:
    img = make_image([1000], media="oci")
    await push_image(registry.url, unique_repo, img, "v1")
    async with mirror_via_proxy(tmp_path, registry.url, tag_ttl=0) as (mirror, proxy):
        url = f"{mirror.url}/v2/{unique_repo}/manifests/v1"
        status, _, body = await get(url)
        assert status == 200 and sha(body) == img.digest
        proxy.reset()
        for _ in range(3):
            status, headers, body = await get(url)
            assert status == 200 and sha(body) == img.digest
            assert headers["Docker-Content-Digest"] == img.digest
        assert proxy.count("HEAD", "manifest") == 3
        assert proxy.count("GET", "manifest") == 0 and proxy.count() == 3


async def test_resume_gives_up_after_three_tries(tmp_path: Path, registry: RegistryProcess,
                                                 unique_repo: str) -> None:
    img = make_image([3_000_000], media="oci", raw=True)
    await push_image(registry.url, unique_repo, img, "v1")
    layer = img.layers[0]
    async with mirror_via_proxy(tmp_path, registry.url) as (mirror, proxy):
        proxy.add_fault(Fault.drop_after(100_000, kind="blob", method="GET", times=None))
        url = f"{mirror.url}/v2/{unique_repo}/blobs/{layer.digest}"
        async with aiohttp.ClientSession() as http, http.get(url) as resp:
            assert resp.status == 200  # bytes were flowing: the only signal is a cut
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()
        gets = proxy.matching("GET", "blob")
        assert len(gets) == 4  # the first try and three resumes
        assert [("Range" in g.headers) for g in gets] == [False, True, True, True]
        store = FilesystemBlobStore(tmp_path / "cache")
        assert await store.stat(Digest.parse(layer.digest)) is None
        assert list((tmp_path / "cache" / "tmp").glob("*.part")) == []


class FlakyStore(FilesystemBlobStore):
    """A disk that is full until ``full`` is cleared."""

    full = True

    def writer(self, digest: Digest) -> Any:
        if not self.full:
            return super().writer(digest)

        @asynccontextmanager
        async def cm() -> AsyncIterator[FsBlobWriter]:
            raise StorageError("No space left on device")
            yield  # pragma: no cover

        return cm()


async def test_caching_resumes_after_the_bypass_window(
        tmp_path: Path, registry: RegistryProcess, unique_repo: str) -> None:
    img = make_image([50_000], media="oci", raw=True)
    await push_image(registry.url, unique_repo, img, "v1")
    layer = img.layers[0]
    now = [500.0]
    store = FlakyStore(tmp_path / "cache")
    async with mirror_via_proxy(tmp_path, registry.url, store=store,
                                app_kw={"clock": lambda: now[0]}) as (mirror, proxy):
        url = f"{mirror.url}/v2/{unique_repo}/blobs/{layer.digest}"
        with capture_logs() as logs:
            status, _, body = await get(url)
            assert status == 200 and body == layer.data
            store.full = False  # space freed, but the bypass window is still open
            now[0] += blobs_module.BYPASS_SECONDS - 1
            status, _, body = await get(url)
            assert status == 200 and body == layer.data
            assert await store.stat(Digest.parse(layer.digest)) is None
            now[0] += 2  # the window is over: the next miss is cached again
            status, _, body = await get(url)
            assert status == 200 and body == layer.data
            assert await store.stat(Digest.parse(layer.digest)) is not None
            status, _, body = await get(url)
            assert status == 200 and body == layer.data
        caches = [e["cache"] for e in logs if e["event"] == "request.finished"]
        assert caches == ["bypass", "bypass", "miss", "hit"]
        assert [e["event"] for e in logs].count("storage.write_failed") == 1
        assert proxy.count("GET", "blob") == 3


async def test_readyz_fails_while_storage_is_not_writable(tmp_path: Path,
                                                          registry: RegistryProcess) -> None:
    async with mirror_via_proxy(tmp_path, registry.url) as (mirror, proxy):
        status, _, body = await get(f"{mirror.url}/readyz")
        assert (status, body) == (200, b'{"status": "ok"}')
        tmp = tmp_path / "cache" / "tmp"
        shutil.rmtree(tmp)
        tmp.write_text("not a directory")  # unwritable even for root
        status, _, body = await get(f"{mirror.url}/readyz")
        doc = json.loads(body)
        assert (status, doc["status"]) == (503, "degraded")
        assert doc["reason"].startswith("storage not writable")
        status, _, _ = await get(f"{mirror.url}/healthz")
        assert status == 200  # alive, just not ready
        tmp.unlink()
        tmp.mkdir()
        status, _, _ = await get(f"{mirror.url}/readyz")
        assert status == 200
        assert proxy.requests == []


async def test_cached_blob_is_sent_with_one_sendfile_call(
        tmp_path: Path, registry: RegistryProcess, unique_repo: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    img = make_image([8 * 1024 * 1024], media="oci", raw=True)
    await push_image(registry.url, unique_repo, img, "v1")
    layer = img.layers[0]
    async with mirror_via_proxy(tmp_path, registry.url) as (mirror, proxy):
        url = f"{mirror.url}/v2/{unique_repo}/blobs/{layer.digest}"
        status, _, body = await get(url)  # cold: now cached
        assert status == 200 and body == layer.data
        loop = asyncio.get_running_loop()
        real = loop.sendfile
        calls: list[int] = []

        async def counting(transport: Any, file: Any, offset: int = 0,
                           count: int | None = None, **kw: Any) -> int:
            calls.append(count or 0)
            return await real(transport, file, offset, count, **kw)

        monkeypatch.setattr(loop, "sendfile", counting)
        status, _, body = await get(url)
        assert status == 200 and sha(body) == layer.digest
        assert calls == [8 * 1024 * 1024]  # the whole blob in one zero-copy call
        assert proxy.count("GET", "blob") == 1
