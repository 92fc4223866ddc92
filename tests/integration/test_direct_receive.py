"""The cold path's fast receive: a thread reads the upstream body straight off the socket
(``Content-Length``, identity; over TLS it takes over asyncio's session), and every other
body (chunked) keeps the event loop's path. Either way: the exact bytes, the digest checked,
one upstream GET, a broken or silent body resumed with Range, the connection slot given
back."""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from structlog.testing import capture_logs

from mirrorcache.api.services import SERVICES
from mirrorcache.oci.reference import Digest
from mirrorcache.storage.fs import FilesystemBlobStore
from tests.support.countingproxy import CountingProxy, Fault
from tests.support.images import Blob, make_image, push_image
from tests.support.mirror import Mirror, mirror_config
from tests.support.registry import RegistryProcess
from tests.support.secure import TestCA

pytestmark = pytest.mark.integration

REPO = "library/direct"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class BlobServer:
    """A registry that only serves blobs, in a chosen way: ``chunked`` (no Content-Length),
    or with ``stall_at`` bytes sent, the first GET goes silent until the client gives up.
    Range requests are answered 206 with a Content-Range."""

    blobs: dict[str, bytes] = field(default_factory=dict)
    chunked: bool = False
    stall_at: int | None = None
    gets: list[dict[str, str]] = field(default_factory=list)

    async def blob(self, request: web.Request) -> web.StreamResponse:
        data = self.blobs.get(request.match_info["digest"])
        if data is None:
            return web.json_response({"errors": [{"code": "BLOB_UNKNOWN", "message": "no"}]},
                                     status=404)
        if request.method == "HEAD":
            return web.Response(headers={"Content-Length": str(len(data))})
        self.gets.append(dict(request.headers))
        start, status, headers = 0, 200, {}
        if request.http_range.start is not None:
            start = request.http_range.start
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        resp = web.StreamResponse(status=status, headers=headers)
        if self.chunked:
            resp.enable_chunked_encoding()
        else:
            resp.content_length = len(body)
        await resp.prepare(request)
        stall = self.stall_at if len(self.gets) == 1 else None
        for pos in range(0, len(body), 256 * 1024):
            piece = body[pos:pos + 256 * 1024]
            if stall is not None and pos + len(piece) > stall:
                await resp.write(piece[:stall - pos])
                await asyncio.sleep(30)  # silent: the client's read_timeout ends this
                return resp
            await resp.write(piece)
        await resp.write_eof()
        return resp

    async def v2(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({})


async def start(server: BlobServer, ssl_ctx: ssl.SSLContext | None = None) -> TestServer:
    app = web.Application()
    app.router.add_get("/v2/", server.v2)
    app.router.add_route("*", "/v2/{repo:.+}/blobs/{digest}", server.blob)
    ts = TestServer(app, host="127.0.0.1")
    await ts.start_server(ssl=ssl_ctx)
    return ts


async def pull(mirror: Mirror, digest: str, repo: str = REPO) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as http, \
            http.get(f"{mirror.url}/v2/{repo}/blobs/{digest}") as resp:
        return resp.status, await resp.read()


def committed(logs: list[dict[str, Any]]) -> list[tuple[str, int]]:
    return [(e["receive"], e["bytes"]) for e in logs if e["event"] == "blob.committed"]


async def assert_cached(tmp_path: Path, digest: str, size: int) -> None:
    info = await FilesystemBlobStore(tmp_path / "cache").stat(Digest.parse(digest))
    assert info is not None and info.size == size
    assert list((tmp_path / "cache" / "tmp").glob("*.part")) == []


async def push_layer(registry: RegistryProcess, repo: str, size: int) -> Blob:
    """One raw layer of ``size`` bytes, pushed to the registry as ``repo:v1``."""
    img = make_image([size], media="oci", raw=True)
    await push_image(registry.url, repo, img, "v1")
    return img.layers[0]


def slots_in_use(mirror: Mirror) -> int:
    return int(mirror.app[SERVICES].blobs._upstreams["docker.io"].http.in_flight)


async def test_plain_http_body_received_off_the_loop_with_tailers(
        tmp_path: Path, registry: RegistryProcess, unique_repo: str,
        hub_and_mirror: tuple[CountingProxy, Mirror]) -> None:
    proxy, mirror = hub_and_mirror
    layer = await push_layer(registry, unique_repo, 5_000_000)
    with capture_logs() as logs:
        results = await asyncio.gather(*(pull(mirror, layer.digest, unique_repo)
                                         for _ in range(5)))
    assert [(s, sha(b)) for s, b in results] == [(200, layer.digest)] * 5
    assert committed(logs) == [("direct", layer.size)]
    assert proxy.count("GET", "blob") == 1
    assert slots_in_use(mirror) == 0
    await assert_cached(tmp_path, layer.digest, layer.size)


def client_first(logs: list[dict[str, Any]]) -> list[int]:
    return [e["client_first"] for e in logs if e["event"] == "blob.committed"]


async def test_first_client_is_fed_from_the_receive_buffer(
        tmp_path: Path, registry: RegistryProcess, unique_repo: str,
        hub_and_mirror: tuple[CountingProxy, Mirror]) -> None:
    """Client first: the caught-up client gets most of the body straight from the receiving
    thread's buffer (before it is hashed and written), never the last byte before the digest
    is checked; its bytes, the cache and the upstream GET count are as without."""
    proxy, mirror = hub_and_mirror
    layer = await push_layer(registry, unique_repo, 24_000_000)
    url = f"{mirror.url}/v2/{unique_repo}/blobs/{layer.digest}"
    with capture_logs() as logs:
        async with aiohttp.ClientSession() as http:  # one kept-alive connection
            bodies, ports = [], []
            for _ in range(2):  # cold, client first; then a hit on the same one
                async with http.get(url) as resp:
                    assert resp.status == 200 and resp.connection is not None
                    transport = resp.connection.transport
                    assert transport is not None
                    ports.append(transport.get_extra_info("sockname")[1])
                    bodies.append(await resp.read())
            assert ports[0] == ports[1]  # the connection was given back, reused
    assert [sha(b) for b in bodies] == [layer.digest] * 2
    [fed] = client_first(logs)
    assert layer.size // 2 < fed <= layer.size - 1
    finished = [e for e in logs if e["event"] == "request.finished"]
    assert [e["bytes"] for e in finished] == [layer.size] * 2  # counts all
    assert proxy.count("GET", "blob") == 1
    await assert_cached(tmp_path, layer.digest, layer.size)


async def test_slow_first_client_takes_its_connection_back(
        tmp_path: Path, registry: RegistryProcess, unique_repo: str,
        hub_and_mirror: tuple[CountingProxy, Mirror]) -> None:
    """A client that does not keep up: the receiving thread's send finds its socket full,
    ends the loan at once (it never waits for a client), and the client gets the rest from
    the spool, every byte right; the download is not slowed for the fast client beside it."""
    proxy, mirror = hub_and_mirror
    layer = await push_layer(registry, unique_repo, 24_000_000)
    url = f"{mirror.url}/v2/{unique_repo}/blobs/{layer.digest}"

    async def slow() -> tuple[int, bytes]:
        conn = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=conn,
                                         read_bufsize=1 << 14) as http, \
                http.get(url) as resp:
            got = bytearray()
            async for piece in resp.content.iter_chunked(1 << 14):
                got += piece
                if len(got) < 4_000_000:
                    await asyncio.sleep(0.002)  # slow at first: the loan ends
            return resp.status, bytes(got)

    with capture_logs() as logs:
        results = await asyncio.gather(slow(), pull(mirror, layer.digest, unique_repo))
    assert [(s, sha(b)) for s, b in results] == [(200, layer.digest)] * 2
    assert proxy.count("GET", "blob") == 1
    assert committed(logs) == [("direct", layer.size)]
    await assert_cached(tmp_path, layer.digest, layer.size)


async def test_direct_body_cut_midway_resumes_with_range(
        tmp_path: Path, registry: RegistryProcess, unique_repo: str,
        hub_and_mirror: tuple[CountingProxy, Mirror]) -> None:
    proxy, mirror = hub_and_mirror
    layer = await push_layer(registry, unique_repo, 4_000_000)
    proxy.add_fault(Fault.drop_after(2_500_000, kind="blob", method="GET"))
    with capture_logs() as logs:
        status, body = await pull(mirror, layer.digest, unique_repo)
    assert status == 200 and body == layer.data
    gets = proxy.matching(method="GET", kind="blob")
    assert len(gets) == 2 and "Range" not in gets[0].headers
    offset = int(gets[1].headers["Range"].removeprefix("bytes=").rstrip("-"))
    assert 0 < offset <= 2_500_000
    assert committed(logs) == [("direct", layer.size)]
    resumes = [e for e in logs if e["event"] == "blob.resume"]
    assert [(e["offset"], e["attempt"]) for e in resumes] == [(offset, 1)]
    assert slots_in_use(mirror) == 0
    await assert_cached(tmp_path, layer.digest, layer.size)


async def test_direct_body_gone_silent_resumes_after_read_timeout(tmp_path: Path) -> None:
    data = os.urandom(3_000_000)
    server = BlobServer(blobs={sha(data): data}, stall_at=1_000_000)
    ts = await start(server)
    try:
        raw = mirror_config(tmp_path, {"docker.io": {"url": str(ts.make_url("")).rstrip("/"),
                                                     "read_timeout": "300ms"}})
        async with Mirror(raw) as mirror:
            loop = asyncio.get_running_loop()
            began = loop.time()
            with capture_logs() as logs:
                status, body = await pull(mirror, sha(data))
            assert status == 200 and body == data
            assert loop.time() - began < 10
            assert len(server.gets) == 2 and "Range" not in server.gets[0]
            assert server.gets[1]["Range"] == "bytes=1000000-"
            resumes = [e for e in logs if e["event"] == "blob.resume"]
            assert [(e["offset"], e["error"]) for e in resumes] == [
                (1_000_000, "SocketTimeoutError")]
            assert committed(logs) == [("direct", len(data))]
            assert slots_in_use(mirror) == 0
    finally:
        await ts.close()


async def test_chunked_body_keeps_the_loop_path(tmp_path: Path) -> None:
    data = os.urandom(3_000_000)
    server = BlobServer(blobs={sha(data): data}, chunked=True)
    ts = await start(server)
    try:
        raw = mirror_config(tmp_path, {"docker.io": {"url": str(ts.make_url("")).rstrip("/")}})
        async with Mirror(raw) as mirror:
            with capture_logs() as logs:
                results = await asyncio.gather(pull(mirror, sha(data)), pull(mirror, sha(data)))
            assert results == [(200, data), (200, data)]
            assert committed(logs) == [("loop", len(data))]
            assert len(server.gets) == 1
            assert slots_in_use(mirror) == 0
            await assert_cached(tmp_path, sha(data), len(data))
    finally:
        await ts.close()


@pytest.mark.parametrize("stall_at", [None, 1_000_000])
async def test_tls_upstream_received_directly(tmp_path: Path, stall_at: int | None) -> None:
    ca = TestCA(tmp_path / "pki")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(ca.cert, ca.key)
    data = os.urandom(3_000_000)
    server = BlobServer(blobs={sha(data): data}, stall_at=stall_at)
    ts = await start(server, ctx)
    try:
        url = f"https://127.0.0.1:{ts.port}"
        raw = mirror_config(tmp_path, {"docker.io": {"url": url, "ca_file": str(ca.ca_file),
                                                     "read_timeout": "300ms"}})
        async with Mirror(raw) as mirror:
            with capture_logs() as logs:
                results = await asyncio.gather(pull(mirror, sha(data)), pull(mirror, sha(data)))
            assert results == [(200, data), (200, data)]
            assert committed(logs) == [("direct", len(data))]
            resumes = [(e["offset"], e["error"]) for e in logs if e["event"] == "blob.resume"]
            if stall_at is None:
                assert len(server.gets) == 1 and resumes == []
            else:
                assert len(server.gets) == 2 and server.gets[1]["Range"] == "bytes=1000000-"
                assert resumes == [(1_000_000, "SocketTimeoutError")]
            assert slots_in_use(mirror) == 0
            await assert_cached(tmp_path, sha(data), len(data))
    finally:
        await ts.close()


async def test_space_guard_refusing_sends_a_direct_receive_to_bypass(
        tmp_path: Path, registry: RegistryProcess, unique_repo: str) -> None:
    """The threaded receive checks the space guard too: a cache with no room commits
    nothing and the pull is served from upstream (bypass), not cached past max_size."""
    img = make_image([3_000_000], media="oci", raw=True)
    await push_image(registry.url, unique_repo, img, "v1")
    layer = img.layers[0]
    async with CountingProxy(registry.url) as proxy:
        raw = mirror_config(tmp_path, {"docker.io": {"url": proxy.url}})
        raw["storage"]["max_size"] = 1_000_000  # smaller than the layer: the guard refuses
        async with Mirror(raw) as mirror:
            with capture_logs() as logs:
                status, body = await pull(mirror, layer.digest, unique_repo)
            assert (status, sha(body)) == (200, layer.digest)
            assert committed(logs) == []
            assert any(e["event"] == "cache.full" for e in logs)
            assert any(e["event"] == "request.finished" and e["cache"] == "bypass"
                       for e in logs)
            assert proxy.count("GET", "blob") == 2  # the refused cache fetch, then bypass
            assert slots_in_use(mirror) == 0
    assert await FilesystemBlobStore(tmp_path / "cache").stat(Digest.parse(layer.digest)) is None


@dataclass
class ChunkedResumeServer(BlobServer):
    """The first GET: ``Content-Length`` (received by a thread), gone silent after
    ``stall_at`` bytes; the resume (Range): chunked (received on the loop), in 256 KiB
    pieces, waiting (bounded) after ``hold_at`` of them until ``progressed`` is set."""

    hold_at: int = 0
    progressed: asyncio.Event = field(default_factory=asyncio.Event)
    held_ok: bool | None = None

    async def blob(self, request: web.Request) -> web.StreamResponse:
        if request.http_range.start is None:
            return await super().blob(request)
        data = self.blobs[request.match_info["digest"]]
        self.gets.append(dict(request.headers))
        start = request.http_range.start
        resp = web.StreamResponse(status=206, headers={
            "Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i, pos in enumerate(range(start, len(data), 256 * 1024)):
            if i == self.hold_at:
                try:  # shorter than the read timeout: the body is not broken
                    await asyncio.wait_for(self.progressed.wait(), 0.8)
                    self.held_ok = True
                except TimeoutError:
                    self.held_ok = False
            await resp.write(data[pos:pos + 256 * 1024])
        await resp.write_eof()
        return resp


async def test_client_first_loan_ends_when_the_resumed_body_comes_on_the_loop(
        tmp_path: Path) -> None:
    """The reader lent its connection while a thread received; the body went silent and
    the resume is chunked, received on the loop (no thread feeds the loan): the reader must
    take its connection back and keep sending from the spool while the resumed body arrives,
    not sit until the whole download is done."""
    data = os.urandom(10_000_000)
    offset = 1_000_000
    server = ChunkedResumeServer(blobs={sha(data): data}, stall_at=offset, hold_at=24)
    ts = await start(server)
    try:
        raw = mirror_config(tmp_path, {"docker.io": {"url": str(ts.make_url("")).rstrip("/"),
                                                     "read_timeout": "1s"}})
        async with Mirror(raw) as mirror:
            with capture_logs() as logs:
                async with aiohttp.ClientSession() as http, \
                        http.get(f"{mirror.url}/v2/{REPO}/blobs/{sha(data)}") as resp:
                    assert resp.status == 200
                    got = bytearray()
                    async for piece in resp.content.iter_chunked(1 << 16):
                        got += piece
                        if len(got) >= offset + (1 << 19):
                            server.progressed.set()
            assert bytes(got) == data
            assert server.held_ok is True  # the client got resumed bytes while held
            assert len(server.gets) == 2 and server.gets[1]["Range"] == f"bytes={offset}-"
            assert committed(logs) == [("direct", len(data))]
            await assert_cached(tmp_path, sha(data), len(data))
    finally:
        await ts.close()


async def test_first_client_behind_gets_the_spool_while_upstream_is_silent(
        tmp_path: Path, registry: RegistryProcess, unique_repo: str) -> None:
    """Client first, the lent client falls behind (its socket full, the thread leaves it a
    gap), then upstream goes quiet (under the read timeout): the client still gets every
    byte already in the spool, as any reader does, not only once upstream speaks again."""
    img = make_image([64_000_000], media="oci", raw=True)
    await push_image(registry.url, unique_repo, img, "v1")
    layer = img.layers[0]
    held = 56_000_000
    async with CountingProxy(registry.url) as proxy:
        gate = asyncio.Event()
        pause = proxy.add_fault(Fault.pause_after(held, gate, kind="blob", method="GET"))
        raw = mirror_config(tmp_path, {"docker.io": {"url": proxy.url}})
        async with Mirror(raw) as mirror:
            url = f"{mirror.url}/v2/{unique_repo}/blobs/{layer.digest}"
            got = bytearray()
            reached = asyncio.Event()

            async def client() -> int:
                async with aiohttp.ClientSession(read_bufsize=1 << 16) as http, \
                        http.get(url) as resp:
                    async for piece in resp.content.iter_chunked(1 << 16):
                        got.extend(piece)
                        if 2_000_000 <= len(got) < 2_000_000 + (1 << 16):
                            await pause.paused.wait()  # behind: upstream ran ahead, quiet
                        if len(got) >= held - (6 << 20):  # (the thread tells of 4 MiB at a time)
                            reached.set()
                    return resp.status

            with capture_logs() as logs:
                task = asyncio.create_task(client())
                try:
                    await asyncio.wait_for(reached.wait(), 5)
                    in_time = True
                except TimeoutError:
                    in_time = False
                at_gate = len(got)
                gate.set()
                status = await task
            assert status == 200 and sha(bytes(got)) == layer.digest
            [fed] = client_first(logs)
            assert fed > 0  # the connection was lent
            assert in_time, f"{at_gate} of {held} bytes while upstream was quiet, fed {fed}"
            assert proxy.count("GET", "blob") == 1
            await assert_cached(tmp_path, layer.digest, layer.size)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode()
    lines = head.split("\r\n")
    length = next(int(v) for k, _, v in (ln.partition(":") for ln in lines[1:])
                  if k.lower() == "content-length")
    return int(lines[0].split()[1]), await reader.readexactly(length)


async def test_client_first_with_ranges_and_pipelined_requests(
        tmp_path: Path, registry: RegistryProcess, unique_repo: str,
        hub_and_mirror: tuple[CountingProxy, Mirror]) -> None:
    """Client first under a Range that ends before the blob does and with requests
    pipelined behind it on the same connection: every answer whole and in order, each
    access-log entry counts its own bytes, one upstream GET."""
    proxy, mirror = hub_and_mirror
    layer = await push_layer(registry, unique_repo, 24_000_000)
    port = int(mirror.host.rsplit(":", 1)[1])
    path = f"/v2/{unique_repo}/blobs/{layer.digest}"
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    with capture_logs() as logs:
        writer.write("".join(
            f"GET {p} HTTP/1.1\r\nHost: x\r\n{h}\r\n"
            for p, h in [(path, "Range: bytes=0-9999999\r\n"), (path, ""),
                         (path, "Range: bytes=5-\r\n"), ("/v2/", "")]).encode())
        answers = [await read_response(reader) for _ in range(4)]
    writer.close()
    assert [s for s, _ in answers] == [206, 200, 206, 200]
    assert answers[0][1] == layer.data[:10_000_000]
    assert answers[1][1] == layer.data and answers[2][1] == layer.data[5:]
    [fed] = client_first(logs)
    assert fed > 0
    finished = [e["bytes"] for e in logs if e["event"] == "request.finished"]
    assert finished[:3] == [10_000_000, layer.size, layer.size - 5]
    assert proxy.count("GET", "blob") == 1
