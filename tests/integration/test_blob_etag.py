"""A blob's validator is its digest: ``ETag: "<digest>"`` on every blob answer (a cached blob
sent with sendfile, one still arriving, ``HEAD``), as Distribution sends, and the conditional
requests decided against it (``If-None-Match`` 304, ``If-Match`` 412, ``If-Range``).

A real mirror in front of a real Distribution registry (through a counting proxy); each test
asserts statuses, headers, bytes and how many requests reached upstream.
"""

from __future__ import annotations

import asyncio
import hashlib

import aiohttp
import pytest
from structlog.testing import capture_logs

from mirrorcache.api.handlers import SENDFILE_LEAD_MIN
from tests.support.countingproxy import CountingProxy, Fault
from tests.support.images import Blob, make_image, push_image
from tests.support.mirror import Mirror
from tests.support.registry import RegistryProcess
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration


async def pushed_layers(registry: RegistryProcess, repo: str, sizes: list[int]) -> list[Blob]:
    img = make_image(sizes, media="oci", raw=True)
    await push_image(registry.url, repo, img, "v1")
    return list(img.layers)


def quoted(layer: Blob) -> str:
    return f'"{layer.digest}"'


async def test_cached_blob_etag_is_its_digest_get_and_head(
        hub_and_mirror: tuple[CountingProxy, Mirror], registry: RegistryProcess,
        unique_repo: str) -> None:
    """A cached blob, small (sendfile alone) and big (written lead + sendfile), whole and
    ranged, and its HEAD: ``ETag: "<digest>"``, never aiohttp's mtime-size tag, and no
    Last-Modified (the digest is the only validator)."""
    hub, mirror = hub_and_mirror
    layers = await pushed_layers(registry, unique_repo, [300_000, SENDFILE_LEAD_MIN + 4321])
    base = f"{mirror.url}/v2/{unique_repo}/blobs"
    async with aiohttp.ClientSession() as http:
        for layer in layers:
            async with http.get(f"{base}/{layer.digest}") as resp:  # cold: now cached
                assert resp.status == 200 and await resp.read() == layer.data
        hub.reset()
        for layer in layers:
            async with http.get(f"{base}/{layer.digest}") as resp:
                assert resp.status == 200
                assert resp.headers["ETag"] == quoted(layer)
                assert "Last-Modified" not in resp.headers
                assert resp.headers["Docker-Content-Digest"] == layer.digest
                assert await resp.read() == layer.data
            async with http.get(f"{base}/{layer.digest}",
                                headers={"Range": "bytes=100-199"}) as resp:
                assert resp.status == 206
                assert resp.headers["ETag"] == quoted(layer)
                assert await resp.read() == layer.data[100:200]
            async with http.head(f"{base}/{layer.digest}") as resp:
                assert resp.status == 200
                assert resp.headers["ETag"] == quoted(layer)
                assert resp.headers["Content-Length"] == str(len(layer.data))
    assert hub.requests == []  # all cached


async def test_inflight_blob_etag_is_its_digest(
        hub_and_mirror: tuple[CountingProxy, Mirror], registry: RegistryProcess,
        unique_repo: str) -> None:
    """A blob still arriving (upstream holds its body after 1 MiB until the headers are
    checked) goes out with the same ``ETag: "<digest>"``; its bytes are whole."""
    hub, mirror = hub_and_mirror
    [layer] = await pushed_layers(registry, unique_repo, [8 << 20])
    gate = asyncio.Event()
    hub.add_fault(Fault.pause_after(1 << 20, gate, method="GET", kind="blob"))
    hub.reset()
    async with aiohttp.ClientSession() as http:
        with capture_logs() as logs:
            async with http.get(f"{mirror.url}/v2/{unique_repo}/blobs/{layer.digest}") as resp:
                assert resp.status == 200
                assert resp.headers["ETag"] == quoted(layer)
                assert resp.headers["Content-Length"] == str(len(layer.data))
                assert not [e for e in logs if e["event"] == "blob.committed"]  # in flight
                gate.set()
                body = await resp.read()
            await wait_until(lambda: any(e["event"] == "request.finished" for e in logs),
                             what="request.finished")
    assert "sha256:" + hashlib.sha256(body).hexdigest() == layer.digest
    finished = [e for e in logs if e["event"] == "request.finished"]
    assert [e["cache"] for e in finished] == ["miss"]
    assert hub.count(kind="blob") == 1


async def test_if_none_match_with_the_digest_is_304_without_a_body(
        hub_and_mirror: tuple[CountingProxy, Mirror], registry: RegistryProcess,
        unique_repo: str) -> None:
    """``If-None-Match: "<digest>"`` (or ``*``, or a list naming it, weak too) is 304 with
    the ETag and no body, for GET and HEAD, cached or not; a blob not cached is confirmed
    with an upstream HEAD, never fetched. Another tag gets the blob."""
    hub, mirror = hub_and_mirror
    cold, warm = await pushed_layers(registry, unique_repo, [200_000, 300_000])
    base = f"{mirror.url}/v2/{unique_repo}/blobs"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/{warm.digest}") as resp:
            assert resp.status == 200 and await resp.read() == warm.data
        hub.reset()
        for layer in (warm, cold):
            for value in (quoted(layer), "*", f'"sha256:{"0" * 64}", W/{quoted(layer)}'):
                for method in ("GET", "HEAD"):
                    async with http.request(method, f"{base}/{layer.digest}",
                                            headers={"If-None-Match": value}) as resp:
                        assert resp.status == 304, (layer is warm, value, method)
                        assert resp.headers["ETag"] == quoted(layer)
                        assert resp.headers["Docker-Content-Digest"] == layer.digest
                        assert await resp.read() == b""
        assert hub.count(kind="blob", method="GET") == 0
        assert hub.count(kind="blob", method="HEAD") >= 1  # the cold one, confirmed
        # A stale tag: the blob itself.
        async with http.get(f"{base}/{warm.digest}",
                            headers={"If-None-Match": '"18ed0c-c800000"'}) as resp:
            assert resp.status == 200 and resp.headers["ETag"] == quoted(warm)
            assert await resp.read() == warm.data
    assert hub.count(kind="blob", method="GET") == 0


async def test_if_match_and_if_range_against_the_digest(
        hub_and_mirror: tuple[CountingProxy, Mirror], registry: RegistryProcess,
        unique_repo: str) -> None:
    """If-Match naming the digest serves the blob (aiohttp alone would compare its own
    mtime-size tag and answer 412), another tag is 412. If-Range naming the digest honours
    the Range (206); another tag or a date makes it ignored: 200 and the whole blob."""
    hub, mirror = hub_and_mirror
    [layer] = await pushed_layers(registry, unique_repo, [300_000])
    url = f"{mirror.url}/v2/{unique_repo}/blobs/{layer.digest}"
    other = '"sha256:' + "0" * 64 + '"'
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as resp:
            assert resp.status == 200 and await resp.read() == layer.data
        hub.reset()
        async with http.get(url, headers={"If-Match": quoted(layer)}) as resp:
            assert resp.status == 200 and await resp.read() == layer.data
        async with http.get(url, headers={"If-Match": other}) as resp:
            assert resp.status == 412 and await resp.read() == b""
        rng = {"Range": "bytes=10-19"}
        async with http.get(url, headers={**rng, "If-Range": quoted(layer)}) as resp:
            assert resp.status == 206 and await resp.read() == layer.data[10:20]
        for validator in (other, "Wed, 02 Dec 2026 07:00:00 GMT"):
            async with http.get(url, headers={**rng, "If-Range": validator}) as resp:
                assert resp.status == 200, validator
                assert resp.headers["ETag"] == quoted(layer)
                assert "Content-Range" not in resp.headers
                assert await resp.read() == layer.data
    assert hub.requests == []
