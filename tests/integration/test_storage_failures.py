"""Failing storage never cuts a client; a corrupt metadata store is replaced; readiness says so."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from structlog.testing import capture_logs

from mirrorcache.api.services import SERVICES
from mirrorcache.connections import CONNECTIONS
from mirrorcache.oci.reference import Digest
from mirrorcache.storage.base import StorageError
from mirrorcache.storage.fs import FilesystemBlobStore, FsBlobWriter
from tests.support.countingproxy import CountingProxy, Fault
from tests.support.images import DOCKER_MANIFEST, OCI_MANIFEST, make_image, push_image
from tests.support.mirror import Mirror, mirror_config
from tests.support.registry import RegistryProcess
from tests.support.skopeo import copied_blob_digests, manifest_digest, skopeo_copy
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def get(url: str, method: str = "GET", **kw: Any) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as http, http.request(method, url, **kw) as resp:
        return resp.status, dict(resp.headers), await resp.read()


class _DiskFullWriter(FsBlobWriter):
    """Writes land until ``fail_after`` bytes, then the disk is full."""

    fail_after = 1 << 20

    def _write_sync(self, chunks: list[bytes]) -> None:
        if self._written + sum(map(len, chunks)) > self.fail_after:
            raise ENOSPC
        super()._write_sync(chunks)


class _CommitFailsWriter(FsBlobWriter):
    """Commits of anything larger than a manifest fail."""

    async def commit(self) -> Any:
        if self._written < 100_000:  # manifests still store
            return await super().commit()
        await self.flush()
        raise StorageError("committing: No space left on device")


class InjectedStore(FilesystemBlobStore):
    """The real filesystem store with a writer class swapped in (manifests still store:
    the injected writers fail only past manifest sizes)."""

    def __init__(self, root: Path, writer_cls: type[FsBlobWriter]) -> None:
        super().__init__(root)
        self._writer_cls = writer_cls

    @asynccontextmanager
    async def writer(self, digest: Digest) -> AsyncIterator[FsBlobWriter]:
        w = self._writer_cls(self, digest)
        try:
            yield w
        finally:
            if not w.finished:
                await w.cancel()


@asynccontextmanager
async def mirror_with(tmp_path: Path, upstream_url: str, store: Any = None, chunk: int = 16384,
                      **mirror_kw: Any) -> AsyncIterator[tuple[Mirror, CountingProxy]]:
    async with CountingProxy(upstream_url, chunk_size=chunk) as proxy:
        raw = mirror_config(tmp_path, {"docker.io": {"url": proxy.url}})
        async with Mirror(raw, store=store, **mirror_kw) as mirror:
            yield mirror, proxy


def _tmp_files(tmp_path: Path) -> list[str]:
    return sorted(os.listdir(tmp_path / "cache" / "tmp"))


async def _assert_degraded(mirror: Mirror, word: str) -> None:
    status, _, body = await get(f"{mirror.url}/readyz")
    doc = json.loads(body)
    assert status == 503 and doc["status"] == "degraded" and word in doc["reason"]
    status, _, _ = await get(f"{mirror.url}/healthz")
    assert status == 200


async def test_claim_publish_failing_bypasses_instead_of_500(
        tmp_path: Path, registry: RegistryProcess, unique_repo: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    img = make_image([300_000], media="oci", raw=True)
    await push_image(registry.url, unique_repo, img, "v1")
    layer = img.layers[0]

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        raise ENOSPC

    async with mirror_with(tmp_path, registry.url) as (mirror, proxy):
        monkeypatch.setattr("mirrorcache.storage.fs.os.pwrite", pwrite)
        with capture_logs() as logs:
            status, _, body = await get(f"{mirror.url}/v2/{unique_repo}/blobs/{layer.digest}")
        assert status == 200 and body == layer.data
        events = [e["event"] for e in logs]
        assert "storage.write_failed" in events and "blob.fetch_crashed" not in events
        assert any(e["event"] == "request.finished" and e["cache"] == "bypass" for e in logs)
        await _assert_degraded(mirror, "storage")
        assert proxy.count("GET", "blob") == 2  # the aborted cache fetch, then the bypass
        assert _tmp_files(tmp_path) == []


async def test_client_gone_before_bypass_headers_releases_the_upstream(
        tmp_path: Path, registry: RegistryProcess, unique_repo: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Bypass mode, and the client disconnects while upstream is still answering: the
    response is never prepared, and the upstream body (and its connection slot) must still
    be released, not held until the process ends."""
    img = make_image([200_000, 300_000], media="oci", raw=True)
    await push_image(registry.url, unique_repo, img, "v1")
    first, second = img.layers

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        raise ENOSPC

    # As the production server runs: a handler is not cancelled when its client goes.
    async with mirror_with(tmp_path, registry.url, handler_cancellation=False) as (mirror,
                                                                                   proxy):
        monkeypatch.setattr("mirrorcache.storage.fs.os.pwrite", pwrite)
        status, _, body = await get(f"{mirror.url}/v2/{unique_repo}/blobs/{first.digest}")
        assert status == 200 and body == first.data  # storage failed: now in bypass
        client = mirror.app[SERVICES].blobs._upstreams["docker.io"].http
        guard = mirror.app[CONNECTIONS]
        assert client.in_flight == 0
        proxy.reset()
        gate = asyncio.Event()
        proxy.add_fault(Fault.hold(gate, kind="blob", method="GET"))

        def note_slots(logger: Any, name: str, event: Any) -> Any:
            if event["event"] == "request.finished":
                event["upstream_in_flight"] = client.in_flight
            return event

        host, port = mirror.host.split(":")
        with capture_logs(processors=[note_slots]) as logs:
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(f"GET /v2/{unique_repo}/blobs/{second.digest} HTTP/1.1\r\n"
                         f"Host: {mirror.host}\r\n\r\n".encode())
            await writer.drain()
            await wait_until(lambda: proxy.count("GET", "blob") == 1 and client.in_flight == 1)
            writer.close()
            await writer.wait_closed()
            await wait_until(lambda: guard.total == 0)  # the mirror saw the client go
            gate.set()  # upstream answers now, to a request nobody waits for
            await wait_until(lambda: any(e["event"] == "request.finished" for e in logs))
        finished = [e for e in logs if e["event"] == "request.finished"]
        # Released by the handler itself, not later by garbage collection of its generator.
        assert [(e["error"], e["bytes"], e["upstream_in_flight"]) for e in finished] == [
            ("client_disconnected", 0, 0)]
        assert client.in_flight == 0
        assert proxy.count("GET", "blob") == 1 and await reader.read() == b""
        # The slot is really free: the next bypass request is served whole.
        status, _, body = await get(f"{mirror.url}/v2/{unique_repo}/blobs/{second.digest}")
        assert status == 200 and body == second.data
        assert proxy.count("GET", "blob") == 2 and client.in_flight == 0


async def test_disk_full_mid_stream_finishes_every_client(
        tmp_path: Path, registry: RegistryProcess, unique_repo: str) -> None:
    img = make_image([4_000_000], media="oci", raw=True)
    await push_image(registry.url, unique_repo, img, "v1")
    layer = img.layers[0]
    store = InjectedStore(tmp_path / "cache", _DiskFullWriter)
    async with mirror_with(tmp_path, registry.url, store) as (mirror, proxy):
        proxy.add_fault(Fault.slow(0.002, kind="blob", method="GET"))
        url = f"{mirror.url}/v2/{unique_repo}/blobs/{layer.digest}"
        with capture_logs() as logs:
            results = await asyncio.gather(
                get(url), get(url), get(url, headers={"Range": "bytes=3000000-3000999"}))
        assert [(s, len(b) if s < 300 else b) for s, _, b in results] == [
            (200, layer.size), (200, layer.size), (206, 1000)]
        assert results[0][2] == layer.data and results[1][2] == layer.data
        assert results[2][2] == layer.data[3_000_000:3_001_000]
        events = [e["event"] for e in logs]
        assert "storage.write_failed" in events and "request.aborted" not in events
        assert "blob.continued_uncached" in events
        # The first fetch, then each reader's rest of the body with a Range request.
        gets = proxy.matching("GET", "blob")
        assert len(gets) == 4 and gets[0].headers.get("Range") is None
        assert all(g.headers.get("Range", "").startswith("bytes=") for g in gets[1:])
        await _assert_degraded(mirror, "storage")
        assert await store.stat(Digest.parse(layer.digest)) is None
        assert _tmp_files(tmp_path) == []


class _DiskFullAt8MiB(_DiskFullWriter):
    fail_after = 8 << 20


@pytest.mark.parametrize("rng", [None, "bytes=0-15999999"])
async def test_disk_full_under_a_lent_connection(
        tmp_path: Path, registry: RegistryProcess, unique_repo: str, rng: str | None) -> None:
    """Client first: the receiving thread sends each stretch to the lent connection before
    writing it, so the client may be past the spool when the disk fills; the rest comes
    from upstream from where the client really is: every byte once, the access log exact."""
    img = make_image([24_000_000], media="oci", raw=True)
    await push_image(registry.url, unique_repo, img, "v1")
    layer = img.layers[0]
    store = InjectedStore(tmp_path / "cache", _DiskFullAt8MiB)
    async with mirror_with(tmp_path, registry.url, store, chunk=1 << 16) as (mirror, proxy):
        url = f"{mirror.url}/v2/{unique_repo}/blobs/{layer.digest}"
        with capture_logs() as logs:
            status, _, body = await get(url, headers={"Range": rng} if rng else {})
        want = layer.data if rng is None else layer.data[:16_000_000]
        assert (status, body == want) == (200 if rng is None else 206, True)
        assert [e["bytes"] for e in logs if e["event"] == "request.finished"] == [len(want)]
        gets = proxy.matching("GET", "blob")
        assert len(gets) == 2 and gets[1].headers["Range"].startswith("bytes=")
        assert _tmp_files(tmp_path) == []


async def test_commit_failing_finishes_the_client(
        tmp_path: Path, registry: RegistryProcess, unique_repo: str) -> None:
    img = make_image([500_000], media="oci", raw=True)
    await push_image(registry.url, unique_repo, img, "v1")
    layer = img.layers[0]
    store = InjectedStore(tmp_path / "cache", _CommitFailsWriter)
    async with mirror_with(tmp_path, registry.url, store) as (mirror, proxy):
        url = f"{mirror.url}/v2/{unique_repo}/blobs/{layer.digest}"
        status, _, body = await get(url)
        assert status == 200 and body == layer.data
        gets = proxy.matching("GET", "blob")
        assert len(gets) == 2 and gets[1].headers.get("Range") == f"bytes={layer.size - 1}-" \
            f"{layer.size - 1}"
        await _assert_degraded(mirror, "storage")
        assert _tmp_files(tmp_path) == []


async def test_failed_fetch_leaves_nothing_in_tmp(
        tmp_path: Path, registry: RegistryProcess, unique_repo: str) -> None:
    img = make_image([5000], media="oci")
    await push_image(registry.url, unique_repo, img, "v1")
    async with mirror_with(tmp_path, registry.url) as (mirror, proxy):
        missing = sha(b"not in the registry")
        status, _, body = await get(f"{mirror.url}/v2/{unique_repo}/blobs/{missing}")
        assert status == 404 and json.loads(body)["errors"][0]["code"] == "BLOB_UNKNOWN"
        proxy.add_fault(Fault.status(503, kind="blob", times=None))
        status, _, _ = await get(f"{mirror.url}/v2/{unique_repo}/blobs/{img.layers[0].digest}")
        assert status == 503
        assert _tmp_files(tmp_path) == []


async def test_corrupt_metadata_before_start(tmp_path: Path, registry: RegistryProcess,
                                             unique_repo: str) -> None:
    img = make_image([20_000, 3000], media="oci")
    await push_image(registry.url, unique_repo, img, "v1")
    async with mirror_with(tmp_path, registry.url) as (mirror, _):
        out = await skopeo_copy(f"docker://{mirror.host}/{unique_repo}:v1", tmp_path / "warm")
        assert manifest_digest(out.dest_dir) == img.digest
    (tmp_path / "cache" / "metadata" / "cache.db").write_bytes(b"\xde\xad" * 50_000)
    with capture_logs() as logs:
        async with mirror_with(tmp_path, registry.url) as (mirror, proxy):
            out = await skopeo_copy(f"docker://{mirror.host}/{unique_repo}:v1",
                                    tmp_path / "after")
            assert copied_blob_digests(out.dest_dir) == set(img.blob_digests)
            await _assert_degraded(mirror, "metadata")
            # Tags re-learnt from upstream; blobs served from the cache once upstream confirms
            # the repository holds them (the links were lost with the store): no blob GET.
            assert proxy.count("GET", "blob") == 0
            assert proxy.count("HEAD", "blob") == len(img.blobs)
    assert any(e["event"] == "metadata.corrupt_moved_aside" for e in logs)
    assert [p.name for p in (tmp_path / "cache").iterdir()
            if p.name.startswith("metadata.corrupt-")]


async def test_corrupt_metadata_while_running(tmp_path: Path, registry: RegistryProcess,
                                              unique_repo: str) -> None:
    img = make_image([20_000], media="oci")
    await push_image(registry.url, unique_repo, img, "v1")
    async with mirror_with(tmp_path, registry.url) as (mirror, proxy):
        out = await skopeo_copy(f"docker://{mirror.host}/{unique_repo}:v1", tmp_path / "warm")
        assert manifest_digest(out.dest_dir) == img.digest
        status, _, _ = await get(f"{mirror.url}/readyz")
        assert status == 200
        proxy.reset()
        db = tmp_path / "cache" / "metadata" / "cache.db"
        with open(db, "r+b") as f:
            f.write(b"\xde\xad" * 50_000)
        for wal in db.parent.glob("cache.db-*"):
            wal.write_bytes(b"\xde\xad" * 1000)
        with capture_logs() as logs:
            for _ in range(2):  # the first may still see pages sqlite had cached
                status, _, body = await get(f"{mirror.url}/v2/{unique_repo}/manifests/v1",
                                            headers={"Accept": OCI_MANIFEST})
                assert status == 200 and sha(body) == img.digest
                for blob in img.blobs:
                    status, _, body = await get(
                        f"{mirror.url}/v2/{unique_repo}/blobs/{blob.digest}")
                    assert status == 200 and sha(body) == blob.digest
        assert any(e["event"] == "metadata.corrupt_moved_aside" for e in logs)
        await _assert_degraded(mirror, "metadata")
        assert proxy.count("GET", "blob") == 0
        assert proxy.count("HEAD", "blob") == len(img.blobs)  # links re-learnt once


async def test_media_type_of_one_upstream_never_changes_anothers(
        tmp_path: Path, registry: RegistryProcess, unique_repo: str) -> None:
    img = make_image([4000], media="oci")
    await push_image(registry.url, unique_repo, img, "v1")
    assert json.loads(img.manifest)["mediaType"] == OCI_MANIFEST
    liar_hits: list[str] = []

    async def manifest(request: web.Request) -> web.Response:
        liar_hits.append(request.method)
        return web.Response(body=img.manifest, headers={
            "Content-Type": DOCKER_MANIFEST, "Docker-Content-Digest": img.digest})

    async def base(request: web.Request) -> web.Response:
        return web.json_response({})

    liar_app = web.Application()
    liar_app.router.add_get("/v2/", base)
    liar_app.router.add_route("*", "/v2/{name:.+}/manifests/{ref}", manifest)
    liar = TestServer(liar_app, host="127.0.0.1")
    await liar.start_server()
    try:
        async with CountingProxy(registry.url) as proxy:
            raw = mirror_config(tmp_path, {"docker.io": {"url": proxy.url},
                                           "liar.test": {"url": str(liar.make_url(""))}})
            async with Mirror(raw) as m:
                status, headers, body = await get(
                    f"{m.url}/v2/liar.test/{unique_repo}/manifests/{img.digest}")
                assert status == 200 and sha(body) == img.digest
                # The bytes say what they are: even the liar's clients get the true type.
                assert headers["Content-Type"] == OCI_MANIFEST
                out = await skopeo_copy(f"docker://{m.host}/{unique_repo}:v1", tmp_path / "o")
                assert manifest_digest(out.dest_dir) == img.digest
                status, headers, body = await get(
                    f"{m.url}/v2/{unique_repo}/manifests/{img.digest}")
                assert status == 200 and headers["Content-Type"] == OCI_MANIFEST
            assert liar_hits == ["GET"]
            assert proxy.count("GET", "manifest") == 0  # content came from the cache
    finally:
        await liar.close()
