"""Client authentication end to end: docker-style 401 challenges, skopeo with credentials,
per-team isolation, anonymous access to a subset, failed-login limiting."""

from __future__ import annotations

import base64
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from structlog.testing import capture_logs

from tests.support.countingproxy import CountingProxy
from tests.support.images import Image, make_image, push_image
from tests.support.mirror import Mirror, mirror_config
from tests.support.registry import RegistryProcess
from tests.support.secure import write_htpasswd
from tests.support.skopeo import SkopeoError, copied_blob_digests, manifest_digest, skopeo_copy

pytestmark = pytest.mark.integration

ALICE = ("alice", "alice-pw-1")  # team-a
BOB = ("bob", "bob-pw-2")  # team-b
ROBOT_TOKEN = "robot-token-0123456789abcdef"  # static token, team-a
CHALLENGE = 'Basic realm="mirrorcache", charset="UTF-8"'


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


class Env:
    def __init__(self, mirror: Mirror, hub: CountingProxy, quay: CountingProxy,
                 registry: RegistryProcess) -> None:
        self.mirror = mirror
        self.hub = hub
        self.quay = quay
        self.registry = registry

    @property
    def upstream_requests(self) -> int:
        return len(self.hub.requests) + len(self.quay.requests)

    def reset(self) -> None:
        self.hub.reset()
        self.quay.reset()

    async def push(self, repo: str) -> Image:
        img = make_image([2000, 5000], media="oci")
        await push_image(self.registry.url, repo, img, "v1")
        return img


@pytest.fixture
async def env(tmp_path: Path, registry: RegistryProcess) -> AsyncIterator[Env]:
    htpasswd = write_htpasswd(tmp_path / "htpasswd", dict([ALICE, BOB]))
    async with CountingProxy(registry.url) as hub, CountingProxy(registry.url) as quay:
        raw = mirror_config(tmp_path, {"docker.io": {"url": hub.url}, "quay.io": {"url": quay.url}},
                            auth={"enabled": True, "htpasswd": str(htpasswd),
                                  "tokens_env": "MC_TOKENS", "max_failed_logins": 3,
                                  "groups": {"team-a": ["alice", "robot"], "team-b": ["bob"]}},
                            policy={"rules": [
                                {"allow": "docker.io/library/*", "anonymous": True},
                                {"allow": "quay.io/team-a/**", "groups": ["team-a"]},
                                {"allow": "quay.io/team-b/**", "groups": ["team-b"]},
                            ]})
        async with Mirror(raw, {"MC_TOKENS": f"robot:{ROBOT_TOKEN}"}) as mirror:
            yield Env(mirror, hub, quay, registry)


async def test_challenges(env: Env) -> None:
    url = env.mirror.url
    async with aiohttp.ClientSession() as http:
        for path in ("/v2/", "/v2"):
            async with http.get(url + path) as resp:
                assert resp.status == 401
                assert resp.headers["WWW-Authenticate"] == CHALLENGE
                assert (await resp.json())["errors"][0]["code"] == "UNAUTHORIZED"
        async with http.get(url + "/v2/", headers=basic(*ALICE)) as resp:
            assert resp.status == 200
        async with http.get(url + "/v2/", headers=basic("robot", ROBOT_TOKEN)) as resp:
            assert resp.status == 200
        async with http.get(url + "/v2/",
                            headers={"Authorization": f"Bearer {ROBOT_TOKEN}"}) as resp:
            assert resp.status == 200
        async with http.get(url + "/v2/", headers={"Authorization": "Bearer nope"}) as resp:
            assert resp.status == 401 and resp.headers["WWW-Authenticate"] == CHALLENGE
        # Anonymous on a repository nobody granted anonymously: 401 (so containerd, which
        # does not ping first, retries with credentials), not 403.
        async with http.get(url + "/v2/quay.io/team-a/x/manifests/v1") as resp:
            assert resp.status == 401 and resp.headers["WWW-Authenticate"] == CHALLENGE
        async with http.head(url + "/v2/quay.io/team-a/x/manifests/v1") as resp:
            assert resp.status == 401 and resp.headers["WWW-Authenticate"] == CHALLENGE
        async with http.get(url + "/healthz") as resp:
            assert resp.status == 200
    assert env.upstream_requests == 0


async def test_per_team_isolation_with_skopeo(env: Env, tmp_path: Path) -> None:
    n = uuid.uuid4().hex[:10]
    a = await env.push(f"team-a/{n}")
    b = await env.push(f"team-b/{n}")
    env.reset()
    out = await skopeo_copy(f"{env.mirror.host}/quay.io/team-a/{n}:v1", tmp_path / "a",
                            creds=ALICE)
    assert manifest_digest(out.dest_dir) == a.digest
    assert copied_blob_digests(out.dest_dir) == set(a.blob_digests)
    out = await skopeo_copy(f"{env.mirror.host}/quay.io/team-b/{n}:v1", tmp_path / "b",
                            creds=BOB)
    assert manifest_digest(out.dest_dir) == b.digest
    assert env.quay.count("GET", "blob") == len(a.blob_digests) + len(b.blob_digests)

    # Team B cannot pull team A's repository, not even from the cache, and vice versa.
    env.reset()
    with capture_logs() as logs:
        with pytest.raises(SkopeoError) as err:
            await skopeo_copy(f"{env.mirror.host}/quay.io/team-a/{n}:v1", tmp_path / "x1",
                              creds=BOB)
        assert "quay.io/team-a" in err.value.stderr and "not on the allowlist" in err.value.stderr
        with pytest.raises(SkopeoError):
            await skopeo_copy(f"{env.mirror.host}/quay.io/team-b/{n}:v1", tmp_path / "x2",
                              creds=ALICE)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{env.mirror.url}/v2/quay.io/team-a/{n}/blobs/"
                                f"{a.layers[0].digest}", headers=basic(*BOB)) as resp:
                assert resp.status == 403
                assert (await resp.json())["errors"][0]["code"] == "DENIED"
        # Anonymous: refused too (401), whatever the cache holds.
        with pytest.raises(SkopeoError):
            await skopeo_copy(f"{env.mirror.host}/quay.io/team-a/{n}:v1", tmp_path / "x3")
    assert env.upstream_requests == 0
    denied = [e for e in logs if e["event"] == "policy.denied"]
    assert {e["identity"] for e in denied} == {"bob", "alice", "anonymous"}
    assert all(e["client"] == "127.0.0.1" for e in denied)

    # The static token (as a Basic password, the way docker/skopeo send it) is team A.
    out = await skopeo_copy(f"{env.mirror.host}/quay.io/team-a/{n}:v1", tmp_path / "robot",
                            creds=("robot", ROBOT_TOKEN))
    assert copied_blob_digests(out.dest_dir) == set(a.blob_digests)
    assert env.upstream_requests == 0


async def test_anonymous_subset_with_skopeo(env: Env, tmp_path: Path) -> None:
    n = uuid.uuid4().hex[:10]
    img = await env.push(f"library/{n}")
    env.reset()
    # skopeo without credentials: the /v2/ ping answers 401, skopeo then sends an empty
    # "Basic Og==" that the mirror treats as anonymous, and the policy lets it in.
    out = await skopeo_copy(f"{env.mirror.host}/{n}:v1", tmp_path / "anon")
    assert manifest_digest(out.dest_dir) == img.digest
    assert env.hub.count("GET", "blob") == len(img.blob_digests)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{env.mirror.url}/v2/library/{n}/manifests/v1",
                            headers={"Accept": img.media_type}) as resp:
            assert resp.status == 200
    # Authenticated users get the anonymous subset too.
    out = await skopeo_copy(f"{env.mirror.host}/docker.io/library/{n}:v1", tmp_path / "bob",
                            creds=BOB)
    assert copied_blob_digests(out.dest_dir) == set(img.blob_digests)


async def test_wrong_credentials_and_rate_limit(env: Env, tmp_path: Path) -> None:
    n = uuid.uuid4().hex[:10]
    await env.push(f"library/{n}")
    env.reset()
    with pytest.raises(SkopeoError) as err:
        await skopeo_copy(f"{env.mirror.host}/{n}:v1", tmp_path / "bad",
                          creds=("alice", "wrong"))
    assert "401" in err.value.stderr or "unauthorized" in err.value.stderr.lower()
    url = f"{env.mirror.url}/v2/library/{n}/manifests/v1"
    with capture_logs() as logs:
        async with aiohttp.ClientSession() as http:
            statuses = []
            for creds in [("alice", "nope"), ("mallory", "x"), ("alice", "again"), ALICE,
                          ("bob", "nope")]:
                async with http.get(url, headers=basic(*creds)) as resp:
                    statuses.append(resp.status)
                    if resp.status == 429:
                        assert int(resp.headers["Retry-After"]) >= 1
                        assert (await resp.json())["errors"][0]["code"] == "TOOMANYREQUESTS"
            assert env.hub.requests == []  # refused logins never reach an upstream
            # Anonymous requests are not blocked by someone else's failed logins.
            async with http.get(url) as resp:
                assert resp.status == 200
    # skopeo's failed pull already used one (or more) of the three allowed failures.
    assert statuses[-2:] == [429, 429] and statuses[0] == 401
    failed = [e for e in logs if e["event"] == "auth.failed"]
    assert failed and failed[0]["client"] == "127.0.0.1" and failed[0]["user"] == "alice"
    assert not any(secret in str(logs) for secret in ("nope", "again", ALICE[1]))
    assert any(e["event"] == "auth.rate_limited" for e in logs)
