"""Upstream authentication: challenge parsing, the token cache, and UpstreamClient against a
fake registry + token realm served by aiohttp TestServers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from mirrorcache.config import UpstreamConfig
from mirrorcache.errors import OCIError
from mirrorcache.metrics import Metrics
from mirrorcache.upstream import auth as auth_mod
from mirrorcache.upstream.auth import Challenge, TokenCache, parse_challenges, pull_scope
from mirrorcache.upstream.client import UpstreamClient, retry_after_seconds

ServerFactory = Callable[..., Awaitable[TestServer]]

# --- parse_challenges --------------------------------------------------------------------


def test_docker_hub_challenge() -> None:
    header = ('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
              'scope="repository:library/alpine:pull"')
    assert parse_challenges(header) == [Challenge("bearer", {
        "realm": "https://auth.docker.io/token",
        "service": "registry.docker.io",
        "scope": "repository:library/alpine:pull",
    })]
    assert parse_challenges(header)[0].realm == "https://auth.docker.io/token"


def test_quoted_commas_and_escapes_stay_in_values() -> None:
    header = (r'Bearer realm="https://a.example/token?x=1,y=2",scope="repository:a/b:pull,push",'
              r'error="say \"hi\", then go"')
    (ch,) = parse_challenges(header)
    assert ch.params == {
        "realm": "https://a.example/token?x=1,y=2",
        "scope": "repository:a/b:pull,push",
        "error": 'say "hi", then go',
    }


def test_multiple_challenges_basic_and_bearer() -> None:
    header = 'Basic realm="Registry Realm", Bearer realm="https://t.example/token",service="reg"'
    assert parse_challenges(header) == [
        Challenge("basic", {"realm": "Registry Realm"}),
        Challenge("bearer", {"realm": "https://t.example/token", "service": "reg"}),
    ]


def test_unquoted_values_and_case() -> None:
    header = "BEARER Realm=https://t.example/token, Service=reg,scope=repository:x:pull"
    assert parse_challenges(header) == [Challenge("bearer", {
        "realm": "https://t.example/token", "service": "reg", "scope": "repository:x:pull"})]


def test_unquoted_then_next_challenge() -> None:
    header = "Basic realm=simple, Bearer realm=https://t.example/token"
    assert [c.scheme for c in parse_challenges(header)] == ["basic", "bearer"]
    assert parse_challenges(header)[0].realm == "simple"
    assert parse_challenges(header)[1].realm == "https://t.example/token"


def test_scheme_without_params_and_empty_header() -> None:
    assert parse_challenges("Basic") == [Challenge("basic", {})]
    assert parse_challenges("") == []
    assert parse_challenges("   ") == []


@given(st.text(max_size=200))
def test_parse_challenges_never_crashes(header: str) -> None:
    result = parse_challenges(header)
    assert isinstance(result, list)
    for ch in result:
        assert ch.scheme == ch.scheme.lower()
        assert all(k == k.lower() for k in ch.params)


def test_pull_scope() -> None:
    assert pull_scope("library/alpine") == "repository:library/alpine:pull"


# --- TokenCache --------------------------------------------------------------------------


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """Replace the ``time`` the auth module sees (not the global time module)."""
    fake = FakeClock()
    monkeypatch.setattr(auth_mod, "time", SimpleNamespace(monotonic=fake))
    return fake


def test_token_cache_keeps_until_margin_before_expiry(clock: FakeClock) -> None:
    cache = TokenCache()
    cache.put("https://r/token", "svc", "repository:a:pull", "tok", lifetime=300)
    assert cache.get("https://r/token", "svc", "repository:a:pull") == "tok"
    clock.now += 300 - auth_mod.EXPIRY_MARGIN - 0.001
    assert cache.get("https://r/token", "svc", "repository:a:pull") == "tok"
    clock.now += 0.001
    assert cache.get("https://r/token", "svc", "repository:a:pull") is None
    # Gone for good, even if asked again.
    clock.now -= 100
    assert cache.get("https://r/token", "svc", "repository:a:pull") is None


def test_token_cache_short_lifetime_kept_at_least_one_second(clock: FakeClock) -> None:
    cache = TokenCache()
    cache.put("r", "s", "scope", "short", lifetime=3)  # 3 - 10 < 1: kept for 1 s
    clock.now += 0.999
    assert cache.get("r", "s", "scope") == "short"
    clock.now += 0.001
    assert cache.get("r", "s", "scope") is None


def test_token_cache_keys_on_realm_service_and_scope(clock: FakeClock) -> None:
    cache = TokenCache()
    cache.put("r", "s", "repository:a:pull", "A", lifetime=60)
    cache.put("r", "s", "repository:b:pull", "B", lifetime=60)
    assert cache.get("r", "s", "repository:a:pull") == "A"
    assert cache.get("r", "s", "repository:b:pull") == "B"
    assert cache.get("r", "other", "repository:a:pull") is None
    assert cache.get("other", "s", "repository:a:pull") is None
    cache.put("r", "s", "repository:a:pull", "A2", lifetime=60)
    assert cache.get("r", "s", "repository:a:pull") == "A2"


# --- retry_after_seconds -----------------------------------------------------------------


def test_retry_after_seconds_forms() -> None:
    assert retry_after_seconds("120", 5.0) == 120.0
    assert retry_after_seconds(None, 5.0) == 5.0
    assert retry_after_seconds("", 5.0) == 5.0
    assert retry_after_seconds("soon", 5.0) == 5.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", 5.0) == 0.0  # in the past


def test_retry_after_seconds_superscript_digit() -> None:
    assert retry_after_seconds("²", 5.0) == 5.0


# --- a fake registry + token realm -------------------------------------------------------



def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


USER, PASSWORD = "alice", "s3cret-pw"
GOOD_BASIC = basic(USER, PASSWORD)
SERVICE = "unit-registry"
_PATH_RE = re.compile(r"/v2/(?P<name>.+)/(?:manifests|blobs)/(?P<ref>[^/]+)")


class FakeRegistry:
    """Registry (bearer or basic auth) + token realm + object storage, recording every call."""

    def __init__(self, mode: str, require_basic_at_realm: bool = True) -> None:
        self.mode = mode
        self.require_basic_at_realm = require_basic_at_realm
        self.expires_in: Any = 300
        self.token_requests: list[dict[str, str | None]] = []
        self.registry_requests: list[tuple[str, str | None]] = []
        self.storage_requests: list[tuple[str, str | None]] = []
        self.tokens: dict[str, str] = {}  # token -> scope it grants
        self.realm_url = ""
        self.storage_url = ""

    # token realm
    async def token(self, request: web.Request) -> web.Response:
        authz = request.headers.get("Authorization")
        self.token_requests.append({"scope": request.query.get("scope"),
                                    "service": request.query.get("service"),
                                    "authorization": authz})
        if self.require_basic_at_realm and authz != GOOD_BASIC:
            return web.json_response({"details": "bad credentials"}, status=401)
        tok = f"tok-{len(self.token_requests)}"
        self.tokens[tok] = request.query.get("scope", "")
        return web.json_response({"token": tok, "expires_in": self.expires_in})

    # registry
    def _authorized(self, name: str, authz: str | None) -> bool:
        if self.mode == "basic":
            return authz == GOOD_BASIC
        if authz is None or not authz.startswith("Bearer "):
            return False
        return self.tokens.get(authz[len("Bearer "):]) == pull_scope(name)

    def _challenge(self, name: str) -> str:
        if self.mode == "basic":
            return 'Basic realm="unit registry"'
        return (f'Bearer realm="{self.realm_url}",service="{SERVICE}",'
                f'scope="{pull_scope(name)}"')

    async def v2(self, request: web.Request) -> web.Response:
        authz = request.headers.get("Authorization")
        self.registry_requests.append((request.path, authz))
        m = _PATH_RE.fullmatch(request.path)
        assert m is not None, request.path
        name, ref = m.group("name"), m.group("ref")
        if not self._authorized(name, authz):
            return web.json_response(
                {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]},
                status=401, headers={"WWW-Authenticate": self._challenge(name)})
        if ref == "cross":
            raise web.HTTPTemporaryRedirect(f"{self.storage_url}/object/{name}")
        if ref == "same":
            raise web.HTTPTemporaryRedirect(f"/v2/{name}/blobs/landed")
        return web.Response(body=f"content of {name}:{ref}".encode())

    # object storage on another host:port
    async def storage(self, request: web.Request) -> web.Response:
        self.storage_requests.append((request.path, request.headers.get("Authorization")))
        return web.Response(body=b"object bytes")

    def registry_auth_headers(self) -> list[str | None]:
        return [a for _, a in self.registry_requests]


async def _start(reg: FakeRegistry, aiohttp_server: ServerFactory) -> TestServer:
    realm_app = web.Application()
    realm_app.router.add_get("/token", reg.token)
    storage_app = web.Application()
    storage_app.router.add_get("/object/{name:.*}", reg.storage)
    registry_app = web.Application()
    registry_app.router.add_get("/v2/{tail:.*}", reg.v2)
    realm = await aiohttp_server(realm_app, host="127.0.0.1")
    storage = await aiohttp_server(storage_app, host="127.0.0.1")
    registry = await aiohttp_server(registry_app, host="127.0.0.1")
    reg.realm_url = f"http://127.0.0.1:{realm.port}/token"
    reg.storage_url = f"http://127.0.0.1:{storage.port}"
    assert len({realm.port, storage.port, registry.port}) == 3
    return registry


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def _client(server: TestServer, session: aiohttp.ClientSession, username: str | None = USER,
            password: str | None = PASSWORD) -> UpstreamClient:
    cfg = UpstreamConfig(
        name="unit.test", url=f"http://127.0.0.1:{server.port}", username=username,
        password=password, max_retries=0, retry_max_wait=1.0, connect_timeout=5.0,
        read_timeout=5.0,
    )
    return UpstreamClient(cfg, session, Metrics())


async def _get(client: UpstreamClient, repo: str, ref: str = "latest",
               kind: str = "manifests") -> tuple[int, bytes]:
    async with client.open("GET", f"/v2/{repo}/{kind}/{ref}", repo) as resp:
        return resp.status, await resp.read()


def _sample(client: UpstreamClient, status: str) -> float | None:
    return client._metrics.registry.get_sample_value(
        "mirrorcache_upstream_requests_total",
        {"upstream": "unit.test", "method": "GET", "status": status})


async def test_bearer_token_fetched_once_and_cached_per_scope(
    aiohttp_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    reg = FakeRegistry("bearer")
    client = _client(await _start(reg, aiohttp_server), session)

    for i in range(5):
        assert await _get(client, "library/alpine", f"v{i}") == (
            200, f"content of library/alpine:v{i}".encode())
    assert len(reg.token_requests) == 1
    assert reg.token_requests[0] == {"scope": "repository:library/alpine:pull",
                                     "service": SERVICE, "authorization": GOOD_BASIC}
    # One anonymous try answered 401, then five requests with the same bearer token.
    auths = reg.registry_auth_headers()
    assert len(auths) == 6
    assert auths[0] is None
    assert auths[1:] == ["Bearer tok-1"] * 5
    assert _sample(client, "401") == 1.0
    assert _sample(client, "200") == 5.0

    # Another repository: another scope, one more token (fetched up front: no extra 401).
    assert await _get(client, "other/repo") == (200, b"content of other/repo:latest")
    assert len(reg.token_requests) == 2
    assert reg.token_requests[1]["scope"] == "repository:other/repo:pull"
    assert reg.registry_auth_headers()[6:] == ["Bearer tok-2"]
    assert _sample(client, "401") == 1.0

    # Credentials went to the realm as Basic, never to the registry.
    assert all(t["authorization"] == GOOD_BASIC for t in reg.token_requests)
    assert not any(a and a.startswith("Basic") for a in reg.registry_auth_headers())
    assert not any(a and PASSWORD in a for a in reg.registry_auth_headers())


async def test_concurrent_first_requests_share_one_token(
    aiohttp_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    reg = FakeRegistry("bearer")
    client = _client(await _start(reg, aiohttp_server), session)
    results = await asyncio.gather(*(_get(client, "library/alpine", f"c{i}") for i in range(5)))
    assert [r[0] for r in results] == [200] * 5
    assert len(reg.token_requests) == 1


async def test_anonymous_bearer_sends_no_credentials_to_realm(
    aiohttp_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    reg = FakeRegistry("bearer", require_basic_at_realm=False)
    client = _client(await _start(reg, aiohttp_server), session, username=None, password=None)
    assert await _get(client, "library/alpine") == (200, b"content of library/alpine:latest")
    assert reg.token_requests == [{"scope": "repository:library/alpine:pull",
                                   "service": SERVICE, "authorization": None}]


async def test_realm_refusing_credentials_is_unauthorized(
    aiohttp_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    reg = FakeRegistry("bearer")
    client = _client(await _start(reg, aiohttp_server), session, password="wrong")
    with pytest.raises(OCIError) as exc_info:
        await _get(client, "library/alpine")
    err = exc_info.value
    assert (err.code, err.status) == ("UNAUTHORIZED", 401)
    assert "repository:library/alpine:pull" in err.message
    assert "wrong" not in err.message
    assert reg.token_requests[0]["authorization"] == basic(USER, "wrong")


async def test_token_refetched_after_it_expires(
    aiohttp_server: ServerFactory, session: aiohttp.ClientSession, clock: FakeClock
) -> None:
    reg = FakeRegistry("bearer")
    reg.expires_in = 60  # kept for 60 - EXPIRY_MARGIN = 50 s
    client = _client(await _start(reg, aiohttp_server), session)
    assert (await _get(client, "library/alpine"))[0] == 200
    clock.now += 49.9
    assert (await _get(client, "library/alpine"))[0] == 200
    assert len(reg.token_requests) == 1
    clock.now += 0.1
    assert (await _get(client, "library/alpine"))[0] == 200
    assert len(reg.token_requests) == 2
    # The expired token was replaced before sending: no second 401.
    assert reg.registry_auth_headers() == [None, "Bearer tok-1", "Bearer tok-1", "Bearer tok-2"]


async def test_revoked_token_gets_a_fresh_one(
    aiohttp_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    reg = FakeRegistry("bearer")
    client = _client(await _start(reg, aiohttp_server), session)
    assert (await _get(client, "library/alpine"))[0] == 200
    reg.tokens.clear()  # the registry forgets every token it issued
    assert await _get(client, "library/alpine", "again") == (
        200, b"content of library/alpine:again")
    assert len(reg.token_requests) == 2
    assert reg.registry_auth_headers()[-2:] == ["Bearer tok-1", "Bearer tok-2"]


async def test_basic_auth_upstream(
    aiohttp_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    reg = FakeRegistry("basic")
    client = _client(await _start(reg, aiohttp_server), session)
    assert await _get(client, "team/app") == (200, b"content of team/app:latest")
    assert reg.registry_auth_headers() == [None, GOOD_BASIC]
    # Once the upstream asked for Basic, later requests send it up front.
    assert await _get(client, "team/other") == (200, b"content of team/other:latest")
    assert reg.registry_auth_headers() == [None, GOOD_BASIC, GOOD_BASIC]
    assert reg.token_requests == []


async def test_basic_challenge_without_or_with_wrong_credentials_relays_401(
    aiohttp_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    reg = FakeRegistry("basic")
    server = await _start(reg, aiohttp_server)
    anonymous = _client(server, session, username=None, password=None)
    assert (await _get(anonymous, "team/app"))[0] == 401
    assert reg.registry_auth_headers() == [None]
    wrong = _client(server, session, password="nope")
    status, body = await _get(wrong, "team/app")
    assert status == 401
    assert b"UNAUTHORIZED" in body
    assert reg.registry_auth_headers() == [None, None,
                                           basic(USER, "nope")]


@pytest.mark.parametrize("mode", ["bearer", "basic"])
async def test_cross_origin_redirect_drops_authorization(
    aiohttp_server: ServerFactory, session: aiohttp.ClientSession, mode: str
) -> None:
    reg = FakeRegistry(mode)
    client = _client(await _start(reg, aiohttp_server), session)
    assert await _get(client, "library/alpine", "cross", "blobs") == (200, b"object bytes")
    assert reg.storage_requests == [("/object/library/alpine", None)]
    # The registry itself did get credentials on the request it redirected.
    last_path, last_auth = reg.registry_requests[-1]
    assert last_path == "/v2/library/alpine/blobs/cross"
    assert last_auth is not None
    assert last_auth.startswith("Bearer " if mode == "bearer" else "Basic ")


@pytest.mark.parametrize("mode", ["bearer", "basic"])
async def test_same_origin_redirect_keeps_authorization(
    aiohttp_server: ServerFactory, session: aiohttp.ClientSession, mode: str
) -> None:
    reg = FakeRegistry(mode)
    client = _client(await _start(reg, aiohttp_server), session)
    assert await _get(client, "library/alpine", "same", "blobs") == (
        200, b"content of library/alpine:landed")
    (redirecting_auth,) = [a for p, a in reg.registry_requests
                           if p.endswith("/same") and a is not None]
    landed = [a for p, a in reg.registry_requests if p.endswith("/landed")]
    assert landed == [redirecting_auth]
    assert reg.storage_requests == []


async def test_scheme_downgrade_redirect_is_refused(
    session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = UpstreamConfig(name="reg.example", url="https://reg.example", username=USER,
                         password=PASSWORD, max_retries=0)
    client = UpstreamClient(cfg, session, Metrics())
    sent: list[tuple[str, str | None]] = []

    async def fake_send(method: str, url: str, headers: CIMultiDict[str], *_: Any,
                        **__: Any) -> Any:
        sent.append((url, headers.get("Authorization")))
        return SimpleNamespace(status=200, headers=CIMultiDict(), release=lambda: None)

    monkeypatch.setattr(client, "_send", fake_send)
    redirect = SimpleNamespace(
        status=307, release=lambda: None,
        headers=CIMultiDict({"Location": "http://reg.example/v2/a/blobs/plain"}))
    hdrs = CIMultiDict({"Authorization": GOOD_BASIC})
    with pytest.raises(OCIError) as err:
        await client._follow_redirects("GET", "https://reg.example/v2/a/blobs/x", hdrs,
                                       redirect)  # type: ignore[arg-type]
    assert err.value.status == 502
    assert "downgrades https to plain http" in err.value.message
    assert sent == []  # nothing sent, with or without credentials
