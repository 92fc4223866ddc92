"""Hostile upstreams and realms (issue 8, upstream side): capped and never-decompressed
bodies, overall deadlines, a breaker only health failures open, pool waits that are not
failures, identity encoding for hashed content, and failure reasons in the first error."""

from __future__ import annotations

import asyncio
import json
import socket
import tracemalloc
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
from mirrorcache.oci.reference import Digest
from mirrorcache.storage.fs import FilesystemBlobStore
from mirrorcache.upstream.breaker import State
from tests.support.countingproxy import CountingProxy, Fault
from tests.support.hostile import Hostile, gzip_bomb, registry_url, sha, start_hostile
from tests.support.images import make_image, push_image
from tests.support.mirror import Mirror, mirror_config
from tests.support.registry import RegistryProcess
from tests.support.skopeo import copied_blob_digests, manifest_digest, skopeo_copy

pytestmark = pytest.mark.integration

MiB = 1 << 20


async def get(url: str, **kw: Any) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as http, http.get(url, **kw) as resp:
        return resp.status, dict(resp.headers), await resp.read()


def code_of(body: bytes) -> str:
    return str(json.loads(body)["errors"][0]["code"])


def message_of(body: bytes) -> str:
    return str(json.loads(body)["errors"][0]["message"])


@asynccontextmanager
async def hostile_mirror(tmp_path: Path, h: Hostile, realm_host: str = "127.0.0.1",
                         **upstream: Any) -> AsyncIterator[Mirror]:
    reg, realm = await start_hostile(h, realm_host)
    try:
        raw = mirror_config(tmp_path, {"docker.io": {"url": registry_url(reg), **upstream}})
        async with Mirror(raw) as mirror:
            yield mirror
    finally:
        await reg.close()
        await realm.close()


def breaker_state(mirror: Mirror) -> State:
    upstreams = mirror.app[SERVICES].manifests._upstreams
    return upstreams["docker.io"].breaker.state


# --- 1. token endpoint memory bomb, caps, deadlines -------------------------------------

@pytest.fixture(scope="module")
def bomb() -> bytes:
    return gzip_bomb(256 * MiB)  # 256 MiB of JSON once decompressed


@pytest.mark.parametrize("mode", ["bomb", "huge_json", "huge_token"])
async def test_hostile_token_endpoint_is_a_clean_502_without_memory_growth(
        tmp_path: Path, bomb: bytes, mode: str) -> None:
    h = Hostile(realm_mode=mode, bomb=bomb)
    h.add_image("team/app", "v1", [b"layer"])
    async with hostile_mirror(tmp_path, h) as mirror:
        loop = asyncio.get_running_loop()
        tracemalloc.start()
        try:
            start = loop.time()
            status, _, body = await get(f"{mirror.url}/v2/team/app/manifests/v1")
            elapsed = loop.time() - start
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert status == 502 and code_of(body) == "UNKNOWN"
    assert "token endpoint" in message_of(body)
    assert elapsed < 5
    # Python allocations while answering stayed far below the body (64 MiB) or its expansion
    # (256 MiB): at most the 64 KiB cap was read, nothing was decompressed.
    assert peak < 8 * MiB, peak
    assert len(h.realm_requests) == 1
    assert h.realm_requests[0]["accept-encoding"] == "identity"
    if mode == "huge_json":
        # The realm could not push more than the cap plus socket buffers before we hung up.
        assert h.body_bytes_sent < 16 * MiB
    # The token never reached the registry.
    assert all("Authorization" not in hdrs for _, _, hdrs in h.requests)


async def test_dripping_realm_and_manifest_hit_the_deadline_while_healthz_answers(
        tmp_path: Path) -> None:
    h = Hostile(realm_mode="drip")
    digest, manifest = h.add_image("team/app", "v1", [b"layer"])
    async with hostile_mirror(tmp_path, h, request_timeout="1500ms") as mirror:
        loop = asyncio.get_running_loop()

        async def healthz_while_waiting() -> list[float]:
            times = []
            for _ in range(5):
                t = loop.time()
                status, _, _ = await get(f"{mirror.url}/healthz")
                assert status == 200
                times.append(loop.time() - t)
                await asyncio.sleep(0.2)
            return times

        start = loop.time()
        (status, _, body), health = await asyncio.gather(
            get(f"{mirror.url}/v2/team/app/manifests/v1"), healthz_while_waiting())
        elapsed = loop.time() - start
        assert status == 503 and code_of(body) == "UNAVAILABLE"
        assert "token endpoint" in message_of(body) and "request timeout" in message_of(body)
        assert 1.4 < elapsed < 4
        assert max(health) < 0.5

        # A manifest that drips one byte a second: the same deadline, then a clean 503.
        h.realm_mode = "ok"
        h.manifest_mode = "drip"
        start = loop.time()
        status, _, body = await get(f"{mirror.url}/v2/team/app/manifests/{digest}")
        elapsed = loop.time() - start
        assert status == 503 and code_of(body) == "UNAVAILABLE", body
        assert 1.4 < elapsed < 4
        assert h.body_bytes_sent < len(manifest)
        # Timeouts on one path count once: one slow manifest did not open the circuit.
        assert breaker_state(mirror) is State.CLOSED


async def test_slow_blob_is_not_cut_by_the_request_deadline(tmp_path: Path) -> None:
    """A blob whose body takes longer than request_timeout, with every read in time."""
    h = Hostile(blob_mode="slow", slow_gap=0.4)
    layer = bytes(range(256)) * 4000
    h.add_image("team/app", "v1", [layer])
    async with hostile_mirror(tmp_path, h, request_timeout="1s", read_timeout="5s") as mirror:
        loop = asyncio.get_running_loop()
        start = loop.time()
        status, _, body = await get(f"{mirror.url}/v2/team/app/blobs/{sha(layer)}")
        assert status == 200 and sha(body) == sha(layer)
        assert loop.time() - start > 1.5  # longer than request_timeout, and it completed


# --- 4. the breaker counts only health failures, by distinct path -----------------------

async def test_manifest_get_by_blob_digest_500s_do_not_open_the_breaker(
        tmp_path: Path, registry: RegistryProcess, unique_repo: str) -> None:
    img = make_image([3000, 5000], media="oci")
    await push_image(registry.url, unique_repo, img, "v1")
    blob = img.layers[0].digest
    async with CountingProxy(registry.url) as proxy:
        raw = mirror_config(tmp_path, {"docker.io": {"url": proxy.url, "max_retries": 0,
                                                     "breaker_failures": 5}})
        async with Mirror(raw) as mirror:
            for _ in range(10):
                status, _, body = await get(f"{mirror.url}/v2/{unique_repo}/manifests/{blob}")
                assert status == 502 and code_of(body) == "UNKNOWN"  # Distribution's 500
            gets = proxy.matching(method="GET", kind="manifest")
            assert len(gets) == 10  # every one reached upstream: nothing failed fast
            assert breaker_state(mirror) is State.CLOSED
            out = await skopeo_copy(f"docker://{mirror.host}/{unique_repo}:v1",
                                    tmp_path / "pull")
            assert manifest_digest(out.dest_dir) == img.digest
            assert copied_blob_digests(out.dest_dir) == set(img.blob_digests)


async def test_one_path_failing_repeatedly_counts_once(
        tmp_path: Path, registry: RegistryProcess, unique_repo: str) -> None:
    img = make_image([3000], media="oci")
    await push_image(registry.url, unique_repo, img, "v1")
    async with CountingProxy(registry.url) as proxy:
        raw = mirror_config(tmp_path, {"docker.io": {"url": proxy.url, "max_retries": 0,
                                                     "breaker_failures": 3,
                                                     "breaker_cooldown": "1h"}})
        async with Mirror(raw) as mirror:
            proxy.add_fault(Fault.status(503, path="/manifests/broken", times=None))
            for _ in range(8):
                status, _, body = await get(f"{mirror.url}/v2/{unique_repo}/manifests/broken")
                assert status == 503 and code_of(body) == "UNAVAILABLE"
            assert proxy.count("HEAD", "manifest") == 8  # a tag is asked for with HEAD
            assert breaker_state(mirror) is State.CLOSED
            status, _, body = await get(f"{mirror.url}/v2/{unique_repo}/manifests/v1")
            assert status == 200 and sha(body) == img.digest


# --- 5. pool exhaustion is not an upstream failure ---------------------------------------

async def test_200_concurrent_cold_blobs_through_8_connections(tmp_path: Path) -> None:
    h = Hostile(hold=0.1)
    layers = [f"blob number {i}".encode() * 50 for i in range(200)]
    h.add_image("team/app", "v1", layers)
    # connect_timeout well below the time the last blobs wait for a slot (25 x 100 ms): the
    # wait for a slot is not a connect timeout, and not an upstream failure.
    async with hostile_mirror(tmp_path, h, max_connections=8, connect_timeout="1s",
                              max_retries=0) as mirror:
        async with aiohttp.ClientSession() as http:
            async def one(data: bytes) -> tuple[int, str]:
                async with http.get(f"{mirror.url}/v2/team/app/blobs/{sha(data)}") as resp:
                    return resp.status, sha(await resp.read())

            loop = asyncio.get_running_loop()
            start = loop.time()
            results = await asyncio.gather(*(one(d) for d in layers))
            elapsed = loop.time() - start
        assert results == [(200, sha(d)) for d in layers]
        assert elapsed >= 2.4  # so the last ones waited for a slot longer than connect_timeout
        assert h.max_in_flight <= 8
        gets = [r for r in h.requests if r[0] == "GET" and "/blobs/" in r[1]]
        assert len(gets) == 200
        assert breaker_state(mirror) is State.CLOSED


async def test_pool_wait_timeout_is_busy_not_an_upstream_failure(tmp_path: Path) -> None:
    h = Hostile(hold=1.0)
    layers = [b"first" * 10, b"second" * 10, b"third" * 10]
    h.add_image("team/app", "v1", layers)
    async with hostile_mirror(tmp_path, h, max_connections=1, pool_timeout="200ms",
                              breaker_failures=1) as mirror:
        results = await asyncio.gather(*(get(f"{mirror.url}/v2/team/app/blobs/{sha(d)}")
                                         for d in layers))
        statuses = sorted(r[0] for r in results)
        assert statuses == [200, 503, 503]
        busy = [r for r in results if r[0] == 503]
        assert all(code_of(b) == "UNAVAILABLE" and "mirror busy" in message_of(b)
                   and hdrs["Retry-After"] == "1" for _, hdrs, b in busy)
        assert breaker_state(mirror) is State.CLOSED
        assert len([r for r in h.requests if "/blobs/" in r[1]]) == 1


# --- 9. identity for hashed content -----------------------------------------------------

async def test_upstream_that_gzips_whenever_it_may(tmp_path: Path) -> None:
    h = Hostile(manifest_mode="gzip", blob_mode="gzip")
    layer = b"compressible layer " * 1000
    digest, _ = h.add_image("team/app", "v1", [layer])
    async with hostile_mirror(tmp_path, h) as mirror:
        status, headers, body = await get(f"{mirror.url}/v2/team/app/manifests/v1")
        assert status == 200 and sha(body) == digest
        assert headers["Docker-Content-Digest"] == digest
        status, _, body = await get(f"{mirror.url}/v2/team/app/blobs/{sha(layer)}")
        assert status == 200 and body == layer
        assert all(hdrs.get("Accept-Encoding") == "identity"
                   for method, path, hdrs in h.requests if method == "GET")
        out = await skopeo_copy(f"docker://{mirror.host}/team/app:v1", tmp_path / "pull")
        assert manifest_digest(out.dest_dir) == digest


# --- issue 9: the first error says what failed -----------------------------------------

def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_first_error_and_open_breaker_say_connection_refused(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    raw = mirror_config(tmp_path, {"docker.io": {"url": url, "max_retries": 0,
                                                 "breaker_failures": 2,
                                                 "breaker_cooldown": "1h"}})
    async with Mirror(raw) as mirror:
        with capture_logs() as logs:
            status, _, body = await get(f"{mirror.url}/v2/team/app/manifests/v1")
        assert status == 503 and code_of(body) == "UNAVAILABLE"
        assert "refused" in message_of(body)
        assert any(e["event"] == "upstream.request_failed" and "refused" in e["reason"]
                   for e in logs)
        await get(f"{mirror.url}/v2/team/app/manifests/v2")  # second failure: circuit opens
        status, headers, body = await get(f"{mirror.url}/v2/team/app/manifests/v3")
        assert status == 503 and "not calling it" in message_of(body)
        assert "refused" in message_of(body)
        assert int(headers["Retry-After"]) > 3000


async def test_tls_to_a_plain_port_says_tls(tmp_path: Path) -> None:
    h = Hostile()
    h.add_image("team/app", "v1", [b"x"])
    reg, realm = await start_hostile(h)
    try:
        raw = mirror_config(tmp_path, {"docker.io": {"url": f"https://127.0.0.1:{reg.port}",
                                                     "max_retries": 0}})
        async with Mirror(raw) as mirror:
            status, _, body = await get(f"{mirror.url}/v2/team/app/manifests/v1")
            assert status == 503 and "TLS" in message_of(body)
    finally:
        await reg.close()
        await realm.close()


async def test_dns_failure_is_named(tmp_path: Path) -> None:
    raw = mirror_config(tmp_path, {"docker.io": {"url": "http://no-such-host.invalid",
                                                 "max_retries": 0}})
    async with Mirror(raw) as mirror:
        status, _, body = await get(f"{mirror.url}/v2/team/app/manifests/v1")
        assert status == 503 and "DNS lookup of no-such-host.invalid" in message_of(body)


# --- credentials and the token realm ----------------------------------------------------

async def test_credentials_not_sent_to_a_realm_on_another_host(tmp_path: Path) -> None:
    """Upstream on 127.0.0.1, realm on localhost: another host, so no credentials."""
    h = Hostile(realm_mode="ok")
    h.add_image("team/app", "v1", [b"x"])
    creds = {"username": "alice", "password_env": "UP_PW"}
    reg, realm = await start_hostile(h, realm_host="localhost")
    try:
        raw = mirror_config(tmp_path, {"docker.io": {"url": registry_url(reg), **creds}})
        async with Mirror(raw, {"UP_PW": "secret-pw"}) as mirror:
            with capture_logs() as logs:
                for _ in range(3):
                    status, _, body = await get(f"{mirror.url}/v2/team/app/manifests/v1")
                    assert status == 502 and code_of(body) == "UNKNOWN"
                    assert "not on the upstream's domain" in message_of(body)
                    assert "token_realms" in message_of(body)
            assert h.realm_requests == []  # the realm never heard from us
            refused = [e for e in logs if e["event"] == "upstream.token_realm_refused"]
            assert len(refused) == 1  # logged once, not per request
            assert "secret-pw" not in str(logs)
        # Listed in token_realms: trusted.
        raw["upstreams"]["docker.io"]["token_realms"] = [f"localhost:{realm.port}"]
        async with Mirror(raw, {"UP_PW": "secret-pw"}) as mirror:
            status, _, body = await get(f"{mirror.url}/v2/team/app/manifests/v1")
            assert status == 200
            assert len(h.realm_requests) == 1
            assert h.realm_requests[0]["authorization"].startswith("Basic ")
    finally:
        await reg.close()
        await realm.close()


async def test_anonymous_token_from_a_foreign_loopback_realm_is_allowed_for_loopback(
        tmp_path: Path) -> None:
    """No credentials configured: nothing of ours to leak, and both hosts are loopback."""
    h = Hostile(realm_mode="ok")
    digest, _ = h.add_image("team/app", "v1", [b"x"])
    async with hostile_mirror(tmp_path, h, realm_host="localhost") as mirror:
        status, _, body = await get(f"{mirror.url}/v2/team/app/manifests/v1")
        assert status == 200 and sha(body) == digest
        assert h.realm_requests == [{"authorization": "", "accept-encoding": "identity"}]


async def test_redirects_to_internal_addresses_of_another_kind_are_refused(
        tmp_path: Path) -> None:
    """A loopback upstream may redirect to another loopback host name and port (object
    storage beside it), but not to a link-local address (a cloud metadata service): that
    is a clean 502, nothing is fetched from there, nothing cached."""
    good, bad = b"stored next door" * 1000, b"never fetched"
    seen: list[str] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        seen.append(request.path)
        if request.path == "/v2/":
            return web.json_response({})
        if request.path == f"/v2/team/app/blobs/{sha(good)}":
            raise web.HTTPTemporaryRedirect(f"http://localhost:{request.url.port}/obj/good")
        if request.path == f"/v2/team/app/blobs/{sha(bad)}":
            raise web.HTTPTemporaryRedirect("http://169.254.169.254/latest/meta-data/")
        if request.path == "/obj/good":
            return web.Response(body=good)
        return web.json_response({"errors": [{"code": "BLOB_UNKNOWN", "message": "no"}]},
                                 status=404)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        raw = mirror_config(tmp_path, {"docker.io": {"url": str(server.make_url(""))}})
        async with Mirror(raw) as mirror:
            status, _, body = await get(f"{mirror.url}/v2/team/app/blobs/{sha(good)}")
            assert status == 200 and body == good
            with capture_logs() as logs:
                status, _, body = await get(f"{mirror.url}/v2/team/app/blobs/{sha(bad)}")
            assert status == 502 and code_of(body) == "UNKNOWN"
            assert "169.254.169.254, a link-local address" in message_of(body)
            assert [e["reason"] for e in logs if e["event"] == "upstream.redirect_refused"
                    ] == ["the redirect goes to 169.254.169.254, a link-local address"]
        assert [p for p in seen if p != "/v2/"] == [
            f"/v2/team/app/blobs/{sha(good)}", "/obj/good", f"/v2/team/app/blobs/{sha(bad)}"]
    finally:
        await server.close()
    fs = FilesystemBlobStore(tmp_path / "cache")
    assert await fs.stat(Digest.parse(sha(bad))) is None
    assert await fs.stat(Digest.parse(sha(good))) is not None
