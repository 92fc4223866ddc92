"""A store that offers only the BlobStore protocol (no local path, no FetchClaims, no
Janitor), as an object-storage backend would: blobs are served from its reader, cold and
warm, whole and ranged, and each digest is still fetched once per process."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from mirrorcache.oci.reference import Digest
from mirrorcache.storage.base import BlobInfo, BlobWriter, FetchClaims, Janitor, StorageError
from mirrorcache.storage.fs import FilesystemBlobStore
from tests.support.countingproxy import CountingProxy, Fault
from tests.support.images import make_image, push_image
from tests.support.mirror import Mirror, mirror_config
from tests.support.registry import RegistryProcess
from tests.support.skopeo import copied_blob_digests, skopeo_copy
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration


class RemoteLikeStore:
    """The filesystem store behind the six protocol methods only; ``local_path`` is None."""

    def __init__(self, root: Path) -> None:
        self._fs = FilesystemBlobStore(root)
        self.reads = 0
        self.fail_reads = False

    async def stat(self, digest: Digest) -> BlobInfo | None:
        return await self._fs.stat(digest)

    def reader(self, digest: Digest, offset: int = 0, length: int | None = None
               ) -> AsyncIterator[bytes]:
        self.reads += 1
        if self.fail_reads:
            return self._failing()
        return self._fs.reader(digest, offset, length)

    async def _failing(self) -> AsyncIterator[bytes]:
        raise StorageError("connection to the object store reset")
        yield b""  # pragma: no cover

    def writer(self, digest: Digest) -> AbstractAsyncContextManager[BlobWriter]:
        return self._fs.writer(digest)

    async def delete(self, digest: Digest) -> None:
        await self._fs.delete(digest)

    def list(self) -> AsyncIterator[BlobInfo]:
        return self._fs.list()

    def local_path(self, digest: Digest) -> Path | None:
        return None


async def get(http: aiohttp.ClientSession, url: str, **kw: Any
              ) -> tuple[int, dict[str, str], bytes]:
    async with http.get(url, **kw) as resp:
        return resp.status, dict(resp.headers), await resp.read()


async def test_blobs_served_from_the_reader_when_not_on_local_disk(
        tmp_path: Path, registry: RegistryProcess, unique_repo: str) -> None:
    img = make_image([3_000_000], media="oci", raw=True)
    await push_image(registry.url, unique_repo, img, "v1")
    layer = img.layers[0]
    data = layer.data
    store = RemoteLikeStore(tmp_path / "cache")
    assert not isinstance(store, FetchClaims) and not isinstance(store, Janitor)
    async with CountingProxy(registry.url, chunk_size=16384) as proxy:
        # A slow body keeps the cold fetch in flight while three clients join it.
        proxy.add_fault(Fault.slow(0.002, kind="blob", method="GET", times=1))
        raw = mirror_config(tmp_path, {"docker.io": {"url": proxy.url}})
        async with Mirror(raw, store=store) as mirror, aiohttp.ClientSession() as http:
            url = f"{mirror.url}/v2/{unique_repo}/blobs/{layer.digest}"
            with capture_logs() as logs:
                cold = await asyncio.gather(get(http, url), get(http, url),
                                            get(http, url, headers={"Range": "bytes=10-19"}))
                assert [c[0] for c in cold] == [200, 200, 206]
                assert cold[0][2] == data and cold[1][2] == data and cold[2][2] == data[10:20]
                status, headers, body = await get(http, url)
                assert status == 200 and body == data
                assert headers["Docker-Content-Digest"] == layer.digest
                assert headers["Content-Length"] == str(len(data))
                status, headers, body = await get(
                    http, url, headers={"Range": "bytes=1000000-1999999"})
                assert status == 206 and body == data[1_000_000:2_000_000]
                assert headers["Content-Range"] == f"bytes 1000000-1999999/{len(data)}"
                status, _, body = await get(http, url, headers={"Range": "bytes=-10"})
                assert status == 206 and body == data[-10:]
                status, headers, body = await get(
                    http, url, headers={"Range": f"bytes={len(data)}-"})
                assert status == 416 and headers["Content-Range"] == f"bytes */{len(data)}"
                assert b"RANGE_INVALID" in body
            assert store.reads == 3  # the warm whole and ranged GETs (not the 416)
            assert proxy.count("GET", "blob") == 1  # single-flight in the process, no claims
            finished = [e for e in logs if e["event"] == "request.finished"]
            assert [e["cache"] for e in finished[3:6]] == ["hit", "hit", "hit"]
            assert [e["bytes"] for e in finished[3:6]] == [len(data), 1_000_000, 10]
            # A real client pulls the whole image through it.
            out = await skopeo_copy(f"docker://{mirror.host}/{unique_repo}:v1", tmp_path / "o")
            assert copied_blob_digests(out.dest_dir) == set(img.blob_digests)
            assert proxy.count("GET", "blob") == 2  # the layer once, and now the config
            # Storage failing under a stored blob: OCI error JSON before the status line.
            store.fail_reads = True
            status, _, body = await get(http, url)
            assert status == 503 and b"UNAVAILABLE" in body
            assert proxy.count("GET", "blob") == 2
            store.fail_reads = False
    got = Digest.parse(layer.digest)
    assert await store.stat(got) == BlobInfo(got, len(data))
    assert "sha256:" + hashlib.sha256(b"".join(
        [c async for c in store.reader(got)])).hexdigest() == layer.digest


async def test_joiner_admitted_after_the_commit_is_served_from_the_store(
        tmp_path: Path, registry: RegistryProcess, unique_repo: str) -> None:
    """A request for another repository joins a fetch, and its confirming HEAD comes back
    only after the fetch committed: with no local path the spool is gone, and the stored
    blob is served (not 500 "in-flight blob vanished")."""
    img = make_image([2_000_000], media="oci", raw=True)
    one, other = f"{unique_repo}/one", f"{unique_repo}/other"
    await push_image(registry.url, one, img, "v1")
    await push_image(registry.url, other, img, "v1")
    layer = img.layers[0]
    store = RemoteLikeStore(tmp_path / "cache")
    gate = asyncio.Event()
    async with CountingProxy(registry.url, chunk_size=16384) as proxy:
        proxy.add_fault(Fault.slow(0.002, kind="blob", method="GET", times=1))
        proxy.add_fault(Fault.hold(gate, kind="blob", method="HEAD"))
        raw = mirror_config(tmp_path, {"docker.io": {"url": proxy.url}})
        async with Mirror(raw, store=store) as mirror, aiohttp.ClientSession() as http:
            base = f"{mirror.url}/v2/%s/blobs/{layer.digest}"
            with capture_logs() as logs:
                first = asyncio.ensure_future(get(http, base % one))
                await wait_until(lambda: proxy.count("GET", "blob") == 1)
                joiner = asyncio.ensure_future(get(http, base % other))
                await wait_until(lambda: proxy.count("HEAD", "blob", repo=other) == 1)
                assert (await first)[::2] == (200, layer.data)
                assert any(e["event"] == "blob.committed" for e in logs)
                gate.set()
                status, headers, body = await joiner
            assert (status, body) == (200, layer.data)
            assert headers["Docker-Content-Digest"] == layer.digest
            assert proxy.count("GET", "blob") == 1
            assert store.reads == 1  # the joiner's body, from the store's reader
