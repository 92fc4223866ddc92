"""ECR upstreams end to end: moto's GetAuthorizationToken (a separate server process) feeds
the credentials to a real Distribution registry with htpasswd auth for user ``AWS`` and the
token's password; skopeo pulls several images through the mirror. Token calls are counted
at a proxy in front of moto, registry requests at a proxy in front of the registry."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.support.countingproxy import CountingProxy, Fault
from tests.support.images import Image, make_image, push_image
from tests.support.mirror import Mirror, mirror_config
from tests.support.registry import RegistryProcess
from tests.support.s3server import REGION, MotoServer, aws_env, aws_session
from tests.support.secure import write_htpasswd
from tests.support.skopeo import copied_blob_digests, manifest_digest, skopeo_copy

pytestmark = pytest.mark.integration

REGISTRY_ID = "210987654321"  # not moto's default account: a cross-account registry id
UPSTREAM = f"{REGISTRY_ID}.dkr.ecr.{REGION}.amazonaws.com"


def token_calls(proxy: CountingProxy) -> int:
    return sum(1 for r in proxy.requests
               if r.headers.get("X-Amz-Target", "").endswith("GetAuthorizationToken"))


async def ecr_password(moto: MotoServer) -> str:
    async with aws_session().create_client("ecr", endpoint_url=moto.url,
                                           region_name=REGION) as ecr:
        resp = await ecr.get_authorization_token(registryIds=[REGISTRY_ID])
    user, _, password = base64.b64decode(
        resp["authorizationData"][0]["authorizationToken"]).decode().partition(":")
    assert user == "AWS"
    return password


class Env:
    def __init__(self, mirror: Mirror, ecr: CountingProxy, upstream: CountingProxy,
                 registry: RegistryProcess, password: str) -> None:
        self.mirror, self.ecr, self.upstream = mirror, ecr, upstream
        self.registry, self.password = registry, password

    async def push(self, repo: str) -> Image:
        img = make_image([3000, 7000], media="oci")
        await push_image(self.registry.url, repo, img, "v1", auth=("AWS", self.password))
        return img

    async def pull(self, repo: str, dest: Path, img: Image) -> None:
        await skopeo_copy(f"{self.mirror.host}/{UPSTREAM}/{repo}:v1", dest)
        assert manifest_digest(dest) == img.digest
        assert copied_blob_digests(dest) == img.blob_digests


@pytest.fixture
async def env(tmp_path: Path, moto_server: MotoServer,
              monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Env]:
    for key, value in aws_env().items():  # the default credential chain of this process
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)
    password = await ecr_password(moto_server)
    htpasswd = write_htpasswd(tmp_path / "htpasswd", {"AWS": password})
    registry = RegistryProcess(workdir=tmp_path / "registry", extra_config={
        "auth": {"htpasswd": {"realm": "ecr-test", "path": str(htpasswd)}}})
    async with registry, CountingProxy(moto_server.url) as ecr, \
            CountingProxy(registry.url) as upstream:
        raw = mirror_config(tmp_path, {UPSTREAM: {
            "url": upstream.url, "type": "ecr", "registry_id": REGISTRY_ID,
            "region": REGION, "endpoint_url": ecr.url}}, default=None)
        async with Mirror(raw) as mirror:
            yield Env(mirror, ecr, upstream, registry, password)


async def test_several_images_one_token_and_a_401_refreshes_once(env: Env,
                                                                 tmp_path: Path) -> None:
    images = {f"team/app{i}": await env.push(f"team/app{i}") for i in range(3)}
    for repo, img in images.items():
        await env.pull(repo, tmp_path / repo, img)
    assert token_calls(env.ecr) == 1
    expected = "Basic " + base64.b64encode(f"AWS:{env.password}".encode()).decode()
    sent = [r.headers.get("Authorization") for r in env.upstream.requests]
    # the first request meets ECR's Basic challenge; every later one carries the token
    assert sent[0] is None and sent[1:] == [expected] * (len(sent) - 1)
    authed = [r for r in env.upstream.requests[1:] if r.kind in ("manifest", "blob")]
    # per image: HEAD of the tag, GET of the manifest by digest, config + 2 layers, once each
    assert sorted((r.method, r.kind) for r in authed) == sorted(
        [("HEAD", "manifest"), ("GET", "manifest")] * 3 + [("GET", "blob")] * 9)

    # upstream refuses the token once (as ECR does when a token was revoked or expired)
    fault = env.upstream.add_fault(Fault.status(
        401, {"WWW-Authenticate": 'Basic realm="https://ecr.test/"'}, kind="manifest"))
    img = await env.push("team/app-after-401")
    env.upstream.reset()
    await env.pull("team/app-after-401", tmp_path / "after", img)
    assert fault.hits == 1
    assert token_calls(env.ecr) == 2  # exactly one refresh
    manifests = [r for r in env.upstream.requests if r.kind == "manifest"]
    # the refused HEAD is retried once with the refreshed token, then the GET by digest
    assert [(r.method, r.fault) for r in manifests] == [("HEAD", "status"), ("HEAD", None),
                                                        ("GET", None)]


async def test_ecr_refusing_the_token_call_is_an_oci_error(env: Env, tmp_path: Path) -> None:
    env.ecr.add_fault(Fault.status(400, {"Content-Type": "application/x-amz-json-1.1"},
                                   b'{"__type": "AccessDeniedException", "message": "no"}',
                                   times=None))
    await env.push("team/denied")
    async with aiohttp.ClientSession() as http, http.get(
            f"{env.mirror.url}/v2/{UPSTREAM}/team/denied/manifests/v1") as resp:
        body = await resp.json()
    assert resp.status == 401
    assert body["errors"][0]["code"] == "UNAUTHORIZED"
    assert "AccessDeniedException" in body["errors"][0]["message"]
    assert not any(r.kind == "manifest" and "Authorization" in r.headers
                   for r in env.upstream.requests)
