"""Warm blobs: how a cached blob leaves the mirror, and what a warm skopeo pull costs.

A body of ``SENDFILE_LEAD_MIN`` bytes or more goes out as a written lead of ``SENDFILE_LEAD``
bytes and the rest by sendfile (handlers.py says why: on a fast link a client's TCP receive
buffer does not grow when the whole body is queued by sendfile); shorter bodies by sendfile
alone. The bytes must be the same whatever the split, whole blobs and ranges alike, and the
access log counts what was sent. The socket is corked while the body goes out (full TCP
segments only, streaming.py says why) and uncorked once it is out.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from mirrorcache.api.handlers import SENDFILE_LEAD, SENDFILE_LEAD_MIN
from tests.support.countingproxy import CountingProxy
from tests.support.images import make_image, push_image
from tests.support.mirror import Mirror
from tests.support.registry import RegistryProcess
from tests.support.skopeo import copied_blob_digests, manifest_digest, skopeo_copy
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
async def sendfile_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int | None]]:
    """(offset, count) of every ``loop.sendfile`` the in-process mirror makes."""
    loop = asyncio.get_running_loop()
    real = loop.sendfile
    calls: list[tuple[int, int | None]] = []

    async def spy(transport: Any, file: Any, offset: int = 0, count: int | None = None,
                  **kw: Any) -> int:
        calls.append((offset, count))
        return await real(transport, file, offset, count, **kw)

    monkeypatch.setattr(loop, "sendfile", spy)
    return calls


async def test_big_cached_blob_written_lead_then_sendfile(
        hub_and_mirror: tuple[CountingProxy, Mirror], registry: RegistryProcess,
        unique_repo: str, sendfile_calls: list[tuple[int, int | None]]) -> None:
    hub, mirror = hub_and_mirror
    size = SENDFILE_LEAD_MIN + 12_345
    img = make_image([size, 300_000], media="oci", raw=True)
    await push_image(registry.url, unique_repo, img, "v1")
    big, small = img.layers
    data = big.data
    base = f"{mirror.url}/v2/{unique_repo}/blobs"
    async with aiohttp.ClientSession() as http:
        for blob in (big, small):  # cold: fetched once, cached
            async with http.get(f"{base}/{blob.digest}") as resp:
                assert resp.status == 200
                assert await resp.read() == blob.data
        hub.reset()
        sendfile_calls.clear()
        with capture_logs() as logs:
            async with http.get(f"{base}/{big.digest}") as resp:
                assert resp.status == 200
                assert resp.headers["Content-Length"] == str(size)
                assert resp.headers["Docker-Content-Digest"] == big.digest
                body = await resp.read()
            assert "sha256:" + hashlib.sha256(body).hexdigest() == big.digest
            assert sendfile_calls == [(SENDFILE_LEAD, size - SENDFILE_LEAD)]

            async with http.get(f"{base}/{small.digest}") as resp:  # small: sendfile alone
                assert resp.status == 200
                assert await resp.read() == small.data
            assert sendfile_calls[1:] == [(0, len(small.data))]

            cases = [  # (first, last): short ranges, and ranges as long as the threshold
                (1000, 1999),
                (SENDFILE_LEAD - 10, SENDFILE_LEAD + 10),
                (10, SENDFILE_LEAD_MIN + 9),
                (12_345, size - 1),
            ]
            for first, last in cases:
                async with http.get(f"{base}/{big.digest}",
                                    headers={"Range": f"bytes={first}-{last}"}) as resp:
                    assert resp.status == 206
                    assert resp.headers["Content-Range"] == f"bytes {first}-{last}/{size}"
                    assert await resp.read() == data[first:last + 1]
            async with http.get(f"{base}/{big.digest}", headers={"Range": "bytes=-10"}) as resp:
                assert resp.status == 206
                assert await resp.read() == data[-10:]
            # Each event is logged once its body is out, maybe after the client has it.
            await wait_until(lambda: sum(e["event"] == "request.finished" and e["cache"] == "hit"
                                         for e in logs) == 7)
    assert sendfile_calls[2:] == [
        (1000, 1000),
        (SENDFILE_LEAD - 10, 21),
        (10 + SENDFILE_LEAD, SENDFILE_LEAD_MIN - SENDFILE_LEAD),
        (12_345 + SENDFILE_LEAD, SENDFILE_LEAD_MIN - SENDFILE_LEAD),
        (size - 10, 10),
    ]
    # The cold requests' events may land after their bodies (and in this capture): left out.
    done = [e for e in logs if e["event"] == "request.finished" and e["cache"] != "miss"]
    assert [(e["status"], e["bytes"], e["cache"]) for e in done] == [
        (200, size, "hit"), (200, len(small.data), "hit"),
        *[(206, last + 1 - first, "hit") for first, last in cases], (206, 10, "hit")]
    assert hub.requests == []


TCP_CORK = getattr(socket, "TCP_CORK", None)


def _cork(sock: Any) -> int:
    assert TCP_CORK is not None
    value: int = sock.getsockopt(socket.IPPROTO_TCP, TCP_CORK)
    return value


@pytest.mark.skipif(TCP_CORK is None, reason="TCP_CORK is Linux's")
async def test_cached_blob_sent_corked_then_uncorked(
        hub_and_mirror: tuple[CountingProxy, Mirror], registry: RegistryProcess,
        unique_repo: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """sendfile of a cached blob runs corked (without, every 64 KiB the kernel hands the
    socket ends in a sliver segment of its own: 1.9x the segments, measured); the socket is
    uncorked once the body is out, so the next response on the kept-alive connection is not
    held. Fails before the cork: 0 at every sendfile."""
    hub, mirror = hub_and_mirror
    img = make_image([SENDFILE_LEAD_MIN + 777, 300_000], media="oci", raw=True)
    await push_image(registry.url, unique_repo, img, "v1")
    loop = asyncio.get_running_loop()
    real = loop.sendfile
    at_sendfile: list[int] = []
    server_socks: list[Any] = []

    async def spy(transport: Any, file: Any, offset: int = 0, count: int | None = None,
                  **kw: Any) -> int:
        sock = transport.get_extra_info("socket")
        at_sendfile.append(_cork(sock))
        server_socks.append(sock)
        return await real(transport, file, offset, count, **kw)

    base = f"{mirror.url}/v2/{unique_repo}/blobs"
    async with aiohttp.ClientSession() as http:
        for blob in img.layers:  # cold: fetched once, cached
            async with http.get(f"{base}/{blob.digest}") as resp:
                assert await resp.read() == blob.data
        hub.reset()
        monkeypatch.setattr(loop, "sendfile", spy)
        for blob in (*img.layers, *img.layers):  # big (a lead, then sendfile), small; twice
            async with http.get(f"{base}/{blob.digest}") as resp:
                assert resp.status == 200
                body = await resp.read()
            assert "sha256:" + hashlib.sha256(body).hexdigest() == blob.digest
            assert _cork(server_socks[-1]) == 0  # the connection stays open, uncorked
        async with http.get(f"{base}/{img.layers[0].digest}",
                            headers={"Range": "bytes=5-9"}) as resp:
            assert resp.status == 206
            assert await resp.read() == img.layers[0].data[5:10]
        assert _cork(server_socks[-1]) == 0
    assert at_sendfile == [1, 1, 1, 1, 1]
    assert len({id(s) for s in server_socks}) <= 2  # kept alive: the same connection(s)
    assert hub.requests == []


async def test_warm_skopeo_pull_asks_upstream_nothing(
        hub_and_mirror: tuple[CountingProxy, Mirror], registry: RegistryProcess,
        unique_repo: str, tmp_path: Path) -> None:
    """A warm pull is four requests (ping, manifest, layer, config), none upstream: no
    revalidation, no HEAD before GET, no second manifest fetch."""
    hub, mirror = hub_and_mirror
    img = make_image([SENDFILE_LEAD_MIN + 1], media="oci", raw=True)
    await push_image(registry.url, unique_repo, img, "v1")
    await skopeo_copy(f"docker://{mirror.host}/{unique_repo}:v1", tmp_path / "cold")
    hub.reset()
    with capture_logs() as logs:
        warm = await skopeo_copy(f"docker://{mirror.host}/{unique_repo}:v1", tmp_path / "warm")
        await wait_until(lambda: sum(e["event"] == "request.finished" and e["cache"] != "miss"
                                     for e in logs) >= 4)
    assert manifest_digest(warm.dest_dir) == img.digest
    assert copied_blob_digests(warm.dest_dir) == set(img.blob_digests)
    # The cold pull's last event may land after skopeo exits (and in this capture): left
    # out; a warm miss would show upstream.
    done = [e for e in logs if e["event"] == "request.finished" and e["cache"] != "miss"]
    kinds = sorted((e["method"], e["path"].rstrip("/").split("/")[-2], e["status"], e["cache"])
                   for e in done)
    assert kinds == sorted([
        ("GET", "", 200, "none"),  # the /v2/ ping
        ("GET", "manifests", 200, "hit"),
        ("GET", "blobs", 200, "hit"),
        ("GET", "blobs", 200, "hit"),
    ])
    assert hub.requests == []
