"""The typed registry operations over a small upstream that answers ranges in every way a
real one might: honestly, in full, with a wrong Content-Range, or by cutting the body."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from mirrorcache.config import UpstreamConfig
from mirrorcache.errors import OCIError
from mirrorcache.metrics import Metrics
from mirrorcache.oci.reference import Digest
from mirrorcache.upstream.client import UpstreamClient
from mirrorcache.upstream.registry import (
    RegistryClient,
    UpstreamBodyBroken,
    UpstreamRangeRefused,
)

BLOB = bytes(range(256)) * 400  # 102400 bytes
DIGEST = Digest.parse("sha256:" + hashlib.sha256(BLOB).hexdigest())


class Upstream:
    def __init__(self) -> None:
        self.mode = "honest"
        self.ranges: list[str | None] = []

    async def blob(self, request: web.Request) -> web.StreamResponse:
        rng = request.headers.get("Range")
        self.ranges.append(rng)
        if request.match_info["digest"] != str(DIGEST):
            return web.json_response({"errors": [{"code": "BLOB_UNKNOWN", "message": "no"}]},
                                     status=404)
        if request.method == "HEAD":
            return web.Response(headers={"Content-Length": str(len(BLOB))})
        if self.mode == "cut":
            resp = web.StreamResponse(headers={"Content-Length": str(len(BLOB))})
            await resp.prepare(request)
            await resp.write(BLOB[:1000])
            assert request.transport is not None
            request.transport.close()
            return resp
        if rng is None or self.mode == "full":
            return web.Response(body=BLOB)
        first, _, last = rng[6:].partition("-")
        start, end = int(first), int(last) + 1 if last else len(BLOB)
        if self.mode == "wrong":
            start += 1
        return web.Response(status=206, body=BLOB[start:end], headers={
            "Content-Range": f"bytes {start}-{end - 1}/{len(BLOB)}"})


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[Upstream, RegistryClient]]:
    up = Upstream()
    app = web.Application()
    app.router.add_route("*", "/v2/{repo:.+}/blobs/{digest}", up.blob)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    cfg = UpstreamConfig(name="unit.test", url=f"http://127.0.0.1:{server.port}",
                         max_retries=0, retry_max_wait=1.0, connect_timeout=5.0,
                         read_timeout=5.0)
    async with aiohttp.ClientSession() as session:
        yield up, RegistryClient(UpstreamClient(cfg, session, Metrics()))
    await server.close()


async def _read(client: RegistryClient, offset: int = 0, end: int | None = None
                ) -> tuple[int | None, int, int | None, bool, str | None, bytes]:
    async with client.open_blob("lib/x", DIGEST, offset, end) as body:
        data = b"".join([c async for c in body.chunks(4096)])
        return body.size, body.start, body.length, body.partial, body.content_range, data


async def test_stat_and_open_blob(upstream: tuple[Upstream, RegistryClient]) -> None:
    up, client = upstream
    assert (await client.stat_blob("lib/x", DIGEST)).size == len(BLOB)
    assert await _read(client) == (len(BLOB), 0, len(BLOB), False, None, BLOB)
    assert await _read(client, 1000, 2000) == (len(BLOB), 1000, 1000, True,
                                               f"bytes 1000-1999/{len(BLOB)}", BLOB[1000:2000])
    assert await _read(client, 5) == (len(BLOB), 5, len(BLOB) - 5, True,
                                      f"bytes 5-{len(BLOB) - 1}/{len(BLOB)}", BLOB[5:])
    assert up.ranges == [None, None, "bytes=1000-1999", "bytes=5-"]
    missing = Digest.parse("sha256:" + "0" * 64)
    with pytest.raises(OCIError) as err:
        await client.stat_blob("lib/x", missing)
    assert (err.value.code, err.value.status) == ("BLOB_UNKNOWN", 404)
    with pytest.raises(OCIError) as err:
        async with client.open_blob("lib/x", missing):
            pass
    assert (err.value.code, err.value.status) == ("BLOB_UNKNOWN", 404)
    assert client.http.in_flight == 0


async def test_range_answered_in_full_or_wrongly(upstream: tuple[Upstream, RegistryClient]
                                                 ) -> None:
    up, client = upstream
    up.mode = "full"  # a 200 to a Range request: the whole body, from 0
    assert await _read(client, 1000) == (len(BLOB), 0, len(BLOB), False, None, BLOB)
    up.mode = "wrong"
    with pytest.raises(UpstreamRangeRefused) as err:
        await _read(client, 1000)
    assert (err.value.code, err.value.status) == ("UNAVAILABLE", 503)
    assert "bytes 1001-" in err.value.message
    assert up.ranges == ["bytes=1000-", "bytes=1000-"] and client.http.in_flight == 0


async def test_cut_body_is_one_typed_error(upstream: tuple[Upstream, RegistryClient]) -> None:
    up, client = upstream
    up.mode = "cut"
    got = bytearray()
    with pytest.raises(UpstreamBodyBroken) as err:
        async with client.open_blob("lib/x", DIGEST) as body:
            async for chunk in body.chunks(4096):
                got += chunk
    assert (err.value.code, err.value.status) == ("UNAVAILABLE", 503)
    assert err.value.reason and bytes(got) == BLOB[:len(got)] and len(got) <= 1000
    assert up.ranges == [None] and client.http.in_flight == 0
