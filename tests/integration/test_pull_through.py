"""End to end: skopeo pulls through mirrorcache from real Distribution registries."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from structlog.testing import capture_logs

from tests.support.countingproxy import CountingProxy
from tests.support.images import Image, Index, make_image, make_multiarch, push_image
from tests.support.mirror import Mirror, mirror_config
from tests.support.registry import RegistryProcess
from tests.support.skopeo import (
    copied_blob_digests,
    copied_manifest_digests,
    manifest_digest,
    skopeo_copy,
)
from tests.support.tokenserver import TokenServer

pytestmark = pytest.mark.integration


class Env:
    """Two upstreams behind counting proxies and a mirror in front of them."""

    def __init__(self, mirror: Mirror, hub: CountingProxy, quay: CountingProxy,
                 registry: RegistryProcess, auth_registry: RegistryProcess,
                 token_server: TokenServer) -> None:
        self.mirror = mirror
        self.hub = hub
        self.quay = quay
        self.registry = registry
        self.auth_registry = auth_registry
        self.token_server = token_server


@pytest.fixture
async def env(tmp_path: Path, registry: RegistryProcess, auth_registry: RegistryProcess,
              token_server: TokenServer) -> AsyncIterator[Env]:
    async with CountingProxy(registry.url) as hub, CountingProxy(auth_registry.url) as quay:
        raw = mirror_config(tmp_path, {
            "docker.io": {"url": hub.url},
            "quay.io": {"url": quay.url},
        })
        async with Mirror(raw) as mirror:
            yield Env(mirror, hub, quay, registry, auth_registry, token_server)


def expected_digests(obj: Image | Index) -> set[str]:
    return set(obj.blob_digests)


async def test_pull_default_upstream_then_cached(env: Env, unique_repo: str,
                                                 tmp_path: Path) -> None:
    img = make_image([4096, 200_000, 50_000], media="oci")
    await push_image(env.registry.url, unique_repo, img, "v1")
    env.hub.reset()

    first = await skopeo_copy(f"docker://{env.mirror.host}/{unique_repo}:v1", tmp_path / "a")
    assert manifest_digest(first.dest_dir) == img.digest
    assert copied_blob_digests(first.dest_dir) == expected_digests(img)
    assert env.hub.count("GET", "blob") == len(img.blob_digests)

    env.hub.reset()
    second = await skopeo_copy(f"docker://{env.mirror.host}/{unique_repo}:v1", tmp_path / "b")
    assert copied_blob_digests(second.dest_dir) == expected_digests(img)
    assert env.hub.count("GET", "blob") == 0
    assert env.hub.count(kind="blob") == 0
    assert env.hub.count("GET", "manifest") == 0  # tag still within tag_ttl


async def test_all_routing_forms_share_one_cache(env: Env, unique_repo: str,
                                                 tmp_path: Path) -> None:
    img = make_image([10_000, 30_000], media="docker")
    await push_image(env.registry.url, unique_repo, img, "1.0")
    env.hub.reset()

    # Host-prefix form (skopeo, crane, podman).
    out = await skopeo_copy(f"docker://{env.mirror.host}/docker.io/{unique_repo}:1.0",
                            tmp_path / "prefix")
    assert manifest_digest(out.dest_dir) == img.digest
    assert copied_blob_digests(out.dest_dir) == expected_digests(img)
    assert env.hub.count("GET", "blob") == len(img.blob_digests)

    # Bare form (Docker daemon registry-mirrors): same cache entries, nothing upstream.
    env.hub.reset()
    out = await skopeo_copy(f"docker://{env.mirror.host}/{unique_repo}:1.0", tmp_path / "bare")
    assert copied_blob_digests(out.dest_dir) == expected_digests(img)
    assert env.hub.count(kind="blob") == 0

    # containerd form (?ns=docker.io): a raw client walks the image like containerd does.
    async with aiohttp.ClientSession() as http:
        base = f"{env.mirror.url}/v2/{unique_repo}"
        async with http.get(f"{base}/manifests/1.0", params={"ns": "docker.io"},
                            headers={"Accept": img.media_type}) as resp:
            assert resp.status == 200
            body = await resp.read()
            assert resp.headers["Docker-Content-Digest"] == img.digest
            assert resp.headers["Content-Type"] == img.media_type
        assert hashlib.sha256(body).hexdigest() == img.digest.split(":")[1]
        for digest in img.blob_digests:
            async with http.get(f"{base}/blobs/{digest}", params={"ns": "docker.io"}) as resp:
                assert resp.status == 200
                data = await resp.read()
            assert "sha256:" + hashlib.sha256(data).hexdigest() == digest
    assert env.hub.count(kind="blob") == 0


async def test_docker_hub_library_normalisation(env: Env, tmp_path: Path) -> None:
    name = f"img{hashlib.sha256(str(tmp_path).encode()).hexdigest()[:10]}"
    img = make_image([5000], media="docker")
    await push_image(env.registry.url, f"library/{name}", img, "3.19")
    env.hub.reset()
    out = await skopeo_copy(f"docker://{env.mirror.host}/{name}:3.19", tmp_path / "a")
    assert manifest_digest(out.dest_dir) == img.digest
    assert {s.repo for s in env.hub.requests if s.kind == "blob"} == {f"library/{name}"}
    env.hub.reset()
    out = await skopeo_copy(f"docker://{env.mirror.host}/library/{name}:3.19", tmp_path / "b")
    assert copied_blob_digests(out.dest_dir) == expected_digests(img)
    assert env.hub.count(kind="blob") == 0


@pytest.mark.parametrize("media", ["oci", "docker"])
async def test_multiarch_index_through_token_auth_upstream(env: Env, unique_repo: str,
                                                           tmp_path: Path, media: str) -> None:
    index = make_multiarch([20_000, 7_000], media=media)  # type: ignore[arg-type]
    await push_image(env.auth_registry.url, unique_repo, index, "multi", auth=env.token_server)
    env.quay.reset()
    tokens_before = env.token_server.count()

    out = await skopeo_copy(f"docker://{env.mirror.host}/quay.io/{unique_repo}:multi",
                            tmp_path / "a", all_images=True)
    assert manifest_digest(out.dest_dir) == index.digest
    assert copied_manifest_digests(out.dest_dir) >= {m.digest for m in index.manifests}
    assert copied_blob_digests(out.dest_dir) == set(index.blob_digests)
    assert env.quay.count("GET", "blob") == len(set(index.blob_digests))
    # One token for the repository, cached across every request of the pull.
    assert env.token_server.count() - tokens_before == 1

    env.quay.reset()
    out = await skopeo_copy(f"docker://{env.mirror.host}/quay.io/{unique_repo}:multi",
                            tmp_path / "b", all_images=True)
    assert copied_blob_digests(out.dest_dir) == set(index.blob_digests)
    assert env.quay.count(kind="blob") == 0
    assert env.quay.count(kind="manifest") == 0


async def test_unknown_upstream_is_refused_without_network(env: Env, unique_repo: str) -> None:
    async with aiohttp.ClientSession() as http:
        for url, params in [
            (f"{env.mirror.url}/v2/ghcr.io/{unique_repo}/manifests/v1", {}),
            (f"{env.mirror.url}/v2/{unique_repo}/manifests/v1", {"ns": "evil.example.com"}),
            (f"{env.mirror.url}/v2/127.0.0.1:1/{unique_repo}/manifests/v1", {}),
        ]:
            async with http.get(url, params=params) as resp:
                assert resp.status == 404
                doc = await resp.json()
                assert doc["errors"][0]["code"] == "NAME_UNKNOWN"
                assert "not configured" in doc["errors"][0]["message"]
    assert env.hub.requests == [] and env.quay.requests == []


async def test_blob_head_miss_asks_upstream_with_head(env: Env, unique_repo: str) -> None:
    img = make_image([12_345], media="oci")
    await push_image(env.registry.url, unique_repo, img, "v1")
    env.hub.reset()
    layer = img.layers[0]
    async with aiohttp.ClientSession() as http:
        url = f"{env.mirror.url}/v2/{unique_repo}/blobs/{layer.digest}"
        async with http.head(url) as resp:
            assert resp.status == 200
            assert int(resp.headers["Content-Length"]) == layer.size
            assert resp.headers["Docker-Content-Digest"] == layer.digest
        assert env.hub.count("HEAD", "blob") == 1 and env.hub.count("GET", "blob") == 0
        missing = "sha256:" + "0" * 64
        async with http.head(f"{env.mirror.url}/v2/{unique_repo}/blobs/{missing}") as resp:
            assert resp.status == 404
        async with http.get(f"{env.mirror.url}/v2/{unique_repo}/blobs/{missing}") as resp:
            assert resp.status == 404
            assert (await resp.json())["errors"][0]["code"] == "BLOB_UNKNOWN"


async def test_range_requests_cold_and_warm(env: Env, unique_repo: str) -> None:
    img = make_image([300_000], media="oci", raw=True)
    await push_image(env.registry.url, unique_repo, img, "v1")
    data = img.layers[0].data
    url = f"{env.mirror.url}/v2/{unique_repo}/blobs/{img.layers[0].digest}"
    async with aiohttp.ClientSession() as http:
        for _ in ("cold", "warm"):
            async with http.get(url, headers={"Range": "bytes=1000-1999"}) as resp:
                assert resp.status == 206
                assert resp.headers["Content-Range"] == f"bytes 1000-1999/{len(data)}"
                assert await resp.read() == data[1000:2000]
            async with http.get(url, headers={"Range": "bytes=-10"}) as resp:
                assert resp.status == 206
                assert await resp.read() == data[-10:]
    assert env.hub.count("GET", "blob") == 1


async def test_tags_list_and_push_refused(env: Env, unique_repo: str) -> None:
    img = make_image([1000], media="oci")
    for tag in ("a", "b", "c"):
        await push_image(env.registry.url, unique_repo, img, tag)
    async with aiohttp.ClientSession() as http:
        url = f"{env.mirror.url}/v2/docker.io/{unique_repo}/tags/list"
        async with http.get(url, params={"n": "2"}) as resp:
            assert resp.status == 200
            assert (await resp.json())["tags"] == ["a", "b"]
            assert f"/v2/docker.io/{unique_repo}/tags/list" in resp.headers["Link"]
        async with http.get(url, params={"n": "2", "last": "b"}) as resp:
            assert (await resp.json())["tags"] == ["c"]
        before = len(env.hub.requests)
        for method in ("PUT", "POST", "DELETE", "PATCH"):
            async with http.request(method, f"{env.mirror.url}/v2/{unique_repo}/manifests/a",
                                    data=b"{}") as resp:
                assert resp.status == 405
                assert (await resp.json())["errors"][0]["code"] == "UNSUPPORTED"
        assert len(env.hub.requests) == before


async def test_manifest_head_and_accept(env: Env, unique_repo: str) -> None:
    index = make_multiarch([2000], media="oci")
    await push_image(env.registry.url, unique_repo, index, "m")
    async with aiohttp.ClientSession() as http:
        url = f"{env.mirror.url}/v2/{unique_repo}/manifests/m"
        async with http.head(url) as resp:
            assert resp.status == 200
            assert resp.headers["Docker-Content-Digest"] == index.digest
            assert int(resp.headers["Content-Length"]) == len(index.manifest)
        child = index.manifests[0]
        async with http.get(f"{env.mirror.url}/v2/{unique_repo}/manifests/{child.digest}",
                            headers={"Accept": child.media_type}) as resp:
            assert resp.status == 200
            assert await resp.read() == child.manifest
            assert json.loads(child.manifest)["mediaType"] == resp.headers["Content-Type"]
        async with http.get(f"{env.mirror.url}/v2/{unique_repo}/manifests/nope") as resp:
            assert resp.status == 404
            assert (await resp.json())["errors"][0]["code"] == "MANIFEST_UNKNOWN"


async def test_unnameable_manifest_reference_is_404_without_upstream(env: Env,
                                                                     unique_repo: str) -> None:
    """The OCI conformance pull workflow: GET and HEAD of ``.INVALID_MANIFEST_NAME`` are 404;
    a malformed digest stays 400 DIGEST_INVALID, whatever the method."""
    async with aiohttp.ClientSession() as http:
        for name in (unique_repo, f"quay.io/{unique_repo}"):
            url = f"{env.mirror.url}/v2/{name}/manifests/.INVALID_MANIFEST_NAME"
            async with http.get(url) as resp:
                assert resp.status == 404
                err = (await resp.json())["errors"][0]
                assert err["code"] == "MANIFEST_UNKNOWN"
                assert "'.INVALID_MANIFEST_NAME'" in err["message"]
                assert "neither a valid tag nor a digest" in err["message"]
            async with http.head(url) as resp:
                assert resp.status == 404
                assert await resp.read() == b""
        bad_digest = f"{env.mirror.url}/v2/{unique_repo}/manifests/sha256:totallywrong"
        for method in ("GET", "PUT"):
            async with http.request(method, bad_digest, data=b"blablabla") as resp:
                assert resp.status == 400
                assert (await resp.json())["errors"][0]["code"] == "DIGEST_INVALID"
        async with http.head(bad_digest) as resp:
            assert resp.status == 400
    assert env.hub.requests == [] and env.quay.requests == []


async def test_request_log_names_route_query_and_relay(env: Env, unique_repo: str) -> None:
    """``request.finished`` says how the client addressed the mirror (route form and query)
    and tells an upstream-answered request (``relay``) from a storage failure (``bypass``)."""
    img = make_image([5000], media="oci")
    await push_image(env.registry.url, unique_repo, img, "v1")
    layer = img.layers[0]
    base = env.mirror.url
    with capture_logs() as logs:
        async with aiohttp.ClientSession() as http:
            for url, params in [
                (f"{base}/v2/{unique_repo}/manifests/v1", {"ns": "docker.io"}),
                (f"{base}/v2/docker.io/{unique_repo}/manifests/v1", {}),
                (f"{base}/v2/{unique_repo}/manifests/v1", {}),
                (f"{base}/v2/{unique_repo}/tags/list", {"n": "5"}),
            ]:
                async with http.get(url, params=params) as resp:
                    assert resp.status == 200
            async with http.head(f"{base}/v2/{unique_repo}/blobs/{layer.digest}") as resp:
                assert resp.status == 200
    done = [e for e in logs if e["event"] == "request.finished"]
    assert [(e["method"], e["route"], e["query"], e["cache"]) for e in done] == [
        ("GET", "ns", "ns=docker.io", "miss"),
        ("GET", "prefix", "", "hit"),
        ("GET", "default", "", "hit"),
        ("GET", "default", "n=5", "relay"),
        ("HEAD", "default", "", "relay"),
    ]
    assert all(e["upstream"] == "docker.io" and e["repository"] == unique_repo for e in done)
    assert env.hub.count("HEAD", "blob") == 1 and env.hub.count("GET", "blob") == 0
