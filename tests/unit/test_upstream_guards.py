"""The upstream guards on their own: the breaker's counting, the realm rule, capped reads."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from mirrorcache.upstream.body import BodyEncoded, BodyTooLarge, read_capped
from mirrorcache.upstream.breaker import CircuitBreaker, State
from mirrorcache.upstream.realm import (
    RealmPolicy,
    is_internal,
    redirect_refusal,
    registrable_domain,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_same_key_counts_once_distinct_keys_open() -> None:
    b = CircuitBreaker("up", failures=3, cooldown=30, clock=Clock())
    for _ in range(10):
        assert b.before_call() is None
        b.failure(key="GET /v2/a/manifests/x", reason="up answered 503")
    assert b.state is State.CLOSED
    b.failure(key="GET /v2/b/manifests/x")
    assert b.state is State.CLOSED
    b.failure(key="GET /v2/c/manifests/x", reason="up answered 502")
    assert b.state is State.OPEN
    rejection = b.before_call()
    assert rejection is not None and rejection.reason == "up answered 502"


def test_unkeyed_transport_failures_each_count_and_success_resets() -> None:
    b = CircuitBreaker("up", failures=3, cooldown=30, clock=Clock())
    b.failure(reason="connection to up refused")
    b.failure(reason="connection to up refused")
    b.success()
    b.failure()
    b.failure()
    assert b.state is State.CLOSED
    b.failure(reason="connection to up refused")
    assert b.state is State.OPEN
    assert b.before_call() is not None


def test_abandoned_probe_lets_the_next_call_probe() -> None:
    clock = Clock()
    b = CircuitBreaker("up", failures=1, cooldown=5, clock=clock)
    b.failure()
    clock.now += 6
    assert b.before_call() is None  # the half-open probe
    assert b.before_call() is not None  # one at a time
    b.abandon()  # the probe was cancelled: no verdict
    assert b.before_call() is None


@pytest.mark.parametrize(("host", "domain"), [
    ("registry-1.docker.io", "docker.io"), ("auth.docker.io", "docker.io"),
    ("quay.io", "quay.io"), ("ghcr.io", "ghcr.io"), ("us-docker.pkg.dev", "pkg.dev"),
    ("myreg.azurecr.io", "myreg.azurecr.io"), ("a.b.example.co.uk", "example.co.uk"),
    ("127.0.0.1", "127.0.0.1"), ("localhost", "localhost"), ("[::1]", "[::1]"),
    ("Auth.Docker.IO.", "docker.io"),
])
def test_registrable_domain(host: str, domain: str) -> None:
    assert registrable_domain(host) == domain


@pytest.mark.parametrize(("upstream", "realm", "credentials", "allowed"), [
    ("https://registry-1.docker.io", "https://auth.docker.io/token", True, True),
    ("https://quay.io", "https://quay.io/v2/auth", True, True),
    ("https://ghcr.io", "https://ghcr.io/token", True, True),
    ("https://gcr.io", "https://gcr.io/v2/token", True, True),
    ("https://myreg.azurecr.io", "https://myreg.azurecr.io/oauth2/token", True, True),
    # another tenant of a shared suffix is another owner
    ("https://myreg.azurecr.io", "https://evil.azurecr.io/oauth2/token", True, False),
    # downgrade to http
    ("https://registry-1.docker.io", "http://auth.docker.io/token", True, False),
    ("https://registry-1.docker.io", "http://auth.docker.io/token", False, False),
    # plain http upstream: plain http realm on its host is fine
    ("http://127.0.0.1:5000", "http://127.0.0.1:6000/token", True, True),
    # foreign host: credentials refused, anonymous allowed
    ("https://nvcr.io", "https://authn.nvidia.com/token", True, False),
    ("https://nvcr.io", "https://authn.nvidia.com/token", False, True),
    # internal addresses are never asked on behalf of a public upstream
    ("https://registry.example", "https://169.254.169.254/token", False, False),
    ("https://registry.example", "https://localhost/token", False, False),
    ("https://registry.example", "https://10.0.0.5/token", False, False),
    ("http://127.0.0.1:5000", "http://localhost:6000/token", True, False),
    ("http://127.0.0.1:5000", "http://localhost:6000/token", False, True),
    ("https://registry.example", "ftp://registry.example/token", False, False),
])
def test_realm_policy(upstream: str, realm: str, credentials: bool, allowed: bool) -> None:
    refusal = RealmPolicy(upstream).refusal(realm, credentials=credentials)
    assert (refusal is None) is allowed, refusal


def test_token_realms_list_hosts_and_urls() -> None:
    by_host = RealmPolicy("https://reg.corp.example", ("sso.other.example",))
    assert by_host.refusal("https://sso.other.example/token", credentials=True) is None
    # a listed host still obeys the scheme rule
    assert by_host.refusal("http://sso.other.example/token", credentials=True) is not None
    assert by_host.refusal("https://sso.other.example.evil/token", credentials=True)
    by_url = RealmPolicy("https://reg.corp.example", ("http://auth.lan:8080/token",))
    assert by_url.refusal("http://auth.lan:8080/token", credentials=True) is None
    assert by_url.refusal("http://auth.lan:8080/token?x=1", credentials=True) is None
    assert by_url.refusal("http://auth.lan:8080/tokens", credentials=True) is not None
    assert by_url.refusal("http://auth.lan:9090/token", credentials=True) is not None


def test_is_internal() -> None:
    assert all(is_internal(h) for h in ("localhost", "127.0.0.1", "[::1]", "169.254.169.254",
                                        "10.1.2.3", "192.168.0.1", "0.0.0.0", "a.localhost"))
    assert not any(is_internal(h) for h in ("docker.io", "8.8.8.8", "auth.docker.io"))


@pytest.mark.parametrize(("upstream", "frm", "to", "allowed"), [
    # object storage, CDNs: public https
    ("https://registry-1.docker.io", "https://registry-1.docker.io/v2/a/blobs/x",
     "https://production.cloudflare.docker.com/r/x?sig=1", True),
    # downgrades, on any hop
    ("https://reg.example", "https://reg.example/v2/a/blobs/x", "http://reg.example/y", False),
    ("https://reg.example", "https://cdn.example/y", "http://cdn2.example/z", False),
    # internal addresses only of the upstream's own kind
    ("https://reg.example", "https://reg.example/v2/a/manifests/t",
     "https://169.254.169.254/latest/meta-data/", False),
    ("https://reg.example", "https://reg.example/x", "http://169.254.169.254/", False),
    ("https://reg.example", "https://reg.example/x", "https://127.0.0.1:8443/x", False),
    ("https://reg.example", "https://reg.example/x", "https://localhost/x", False),
    ("https://reg.example", "https://reg.example/x", "https://10.0.0.5/x", False),
    ("https://reg.example", "https://reg.example/x", "https://[::ffff:127.0.0.1]/x", False),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000/v2/a/blobs/x",
     "http://localhost:6000/obj", True),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000/x", "http://169.254.169.254/", False),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000/x", "http://10.0.0.5/", False),
    ("https://10.1.2.3", "https://10.1.2.3/x", "https://192.168.1.9:9000/minio", True),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000/x", "ftp://127.0.0.1/x", False),
])
def test_redirect_refusal(upstream: str, frm: str, to: str, allowed: bool) -> None:
    assert (redirect_refusal(upstream, frm, to) is None) == allowed


async def _serve(handler: web.RequestHandler) -> TestServer:  # type: ignore[type-arg]
    app = web.Application()
    app.router.add_get("/", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


@pytest.mark.parametrize(("chunked", "size", "limit"), [(True, 100, 100), (False, 100, 100),
                                                         (True, 101, 100), (False, 101, 100)])
async def test_read_capped(chunked: bool, size: int, limit: int) -> None:

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        if chunked:
            resp.enable_chunked_encoding()
        else:
            resp.content_length = size
        await resp.prepare(request)
        for i in range(size):
            await resp.write(bytes([65 + i % 26]))
        return resp

    server = await _serve(handler)
    try:
        async with aiohttp.ClientSession() as http, http.get(server.make_url("/")) as resp:
            if size > limit:
                with pytest.raises(BodyTooLarge):
                    await read_capped(resp, limit, "thing")
            else:
                assert len(await read_capped(resp, limit, "thing")) == size
        async with aiohttp.ClientSession() as http, http.get(server.make_url("/")) as resp:
            assert len(await read_capped(resp, limit, "thing", truncate=True)) == min(size, limit)
    finally:
        await server.close()


async def test_read_capped_refuses_encoded_bodies() -> None:

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=b"\x1f\x8b...", headers={"Content-Encoding": "gzip"})

    server = await _serve(handler)
    try:
        async with aiohttp.ClientSession(auto_decompress=False) as http, \
                http.get(server.make_url("/")) as resp:
            with pytest.raises(BodyEncoded, match="gzip"):
                await read_capped(resp, 1000, "manifest")
    finally:
        await server.close()
