"""Self-tests of the integration support code, run against docker-registry without mirrorcache.

They prove that generated images round-trip byte for byte through the real registry and
skopeo, that token auth works end to end, and that CountingProxy counts and injects faults.
"""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from tests.support.countingproxy import CountingProxy, Fault, classify
from tests.support.images import (
    MANIFEST_ACCEPT,
    Image,
    Index,
    RegistryClient,
    basic_auth_header,
    make_image,
    make_index,
    push_image,
)
from tests.support.registry import RegistryProcess
from tests.support.skopeo import (
    copied_blob_digests,
    copied_manifest_digests,
    manifest_digest,
    skopeo_copy,
    skopeo_inspect_raw,
)
from tests.support.tokenserver import TokenServer

pytestmark = pytest.mark.integration


def _assert_copied(dest: Path, obj: Image | Index) -> None:
    assert manifest_digest(dest) == obj.digest
    assert copied_blob_digests(dest) == obj.blob_digests
    assert copied_manifest_digests(dest) == {obj.digest, *(m.digest for m in obj.manifests)}


def _docker_multiarch() -> Index:
    return make_index(
        [
            make_image([2048, 70_000], "docker", arch="amd64"),
            make_image([4096], "docker", arch="arm64", variant="v8"),
        ],
        "docker",
    )


async def test_oci_single_arch_roundtrip(
    registry: RegistryProcess, unique_repo: str, tmp_path: Path
) -> None:
    image = make_image([1024, 300_000, 5], "oci")
    await push_image(registry.url, unique_repo, image, "v1")

    await skopeo_copy(f"{registry.host}/{unique_repo}:v1", tmp_path / "out")

    _assert_copied(tmp_path / "out", image)
    for layer in image.layers:
        assert (tmp_path / "out" / layer.digest.removeprefix("sha256:")).read_bytes() == layer.data


async def test_docker_multiarch_roundtrip(
    registry: RegistryProcess, unique_repo: str, tmp_path: Path
) -> None:
    index = _docker_multiarch()
    await push_image(registry.url, unique_repo, index, "multi")

    raw = await skopeo_inspect_raw(f"{registry.host}/{unique_repo}:multi")
    assert raw == index.manifest
    await skopeo_copy(f"{registry.host}/{unique_repo}:multi", tmp_path / "all", all_images=True)
    _assert_copied(tmp_path / "all", index)

    # Without --all skopeo picks one platform: only that child's manifest and blobs arrive.
    await skopeo_copy(
        f"{registry.host}/{unique_repo}:multi", tmp_path / "arm", override_arch="arm64"
    )
    _assert_copied(tmp_path / "arm", index.child("arm64"))


async def test_token_auth_roundtrip(
    auth_registry: RegistryProcess, token_server: TokenServer, unique_repo: str, tmp_path: Path
) -> None:
    image = make_image([2000, 3000], "oci")
    oci_index = make_index([image, make_image([100], "oci", arch="arm64")], "oci")
    before = len(token_server.requests)

    # Anonymous access is refused by the registry itself.
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{auth_registry.url}/v2/{unique_repo}/tags/list") as resp:
            assert resp.status == 401
            assert resp.headers["WWW-Authenticate"].startswith(f'Bearer realm="{token_server.url}')

    await push_image(auth_registry.url, unique_repo, oci_index, "v1", auth=token_server)
    pushes = token_server.requests[before:]
    assert pushes and all(f"repository:{unique_repo}:pull,push" in r.scopes for r in pushes)

    await skopeo_copy(f"{auth_registry.host}/{unique_repo}:v1", tmp_path / "out", all_images=True)
    _assert_copied(tmp_path / "out", oci_index)
    pulls = token_server.requests[before + len(pushes) :]
    assert any(s == f"repository:{unique_repo}:pull" for r in pulls for s in r.scopes)


async def test_token_server_basic_auth(tmp_path: Path) -> None:
    with TokenServer(require_basic=("alice", "s3cret"), workdir=tmp_path) as ts:
        async with aiohttp.ClientSession() as http:
            params = {"service": "svc", "scope": "repository:a/b:pull"}
            async with http.get(ts.realm, params=params) as resp:
                assert resp.status == 401
            auth = {"Authorization": basic_auth_header("alice", "s3cret")}
            async with http.get(ts.realm, params=params, headers=auth) as resp:
                assert resp.status == 200
                body = await resp.json()
        assert body["token"] == body["access_token"] and body["expires_in"] == 300
        assert [r.has_authorization for r in ts.requests] == [False, True]
        assert ts.requests[1].account == "alice"


async def test_counting_proxy_counts_skopeo_blob_gets(
    registry: RegistryProcess, unique_repo: str, tmp_path: Path
) -> None:
    image = make_image([1000, 2000, 3000], "docker")
    await push_image(registry.url, unique_repo, image, "v1")

    async with CountingProxy(registry.url) as proxy:
        await skopeo_copy(f"{proxy.host}/{unique_repo}:v1", tmp_path / "out")
        _assert_copied(tmp_path / "out", image)
        # 3 layers + config, each fetched exactly once.
        assert proxy.count("GET", "blob") == 4
        assert proxy.count("GET", "blob", repo=unique_repo) == 4
        assert {s.reference for s in proxy.matching("GET", "blob")} == image.blob_digests
        assert proxy.count("GET", "manifest") >= 1
        assert proxy.count(kind="upload") == 0

        # Pushing through the proxy works too (upload Location is rewritten to the proxy).
        proxy.reset()
        other = make_image([500], "oci")
        await push_image(proxy.url, f"{unique_repo}-copy", other, "v1")
        assert proxy.count("POST", "upload") == 2
        assert proxy.count("PUT", "upload") == 2
        assert proxy.count("PUT", "manifest") == 1


async def test_counting_proxy_status_fault(registry: RegistryProcess, unique_repo: str) -> None:
    image = make_image([100], "oci")
    await push_image(registry.url, unique_repo, image, "v1")
    layer = image.layers[0]

    async with CountingProxy(registry.url) as proxy, aiohttp.ClientSession() as http:
        fault = proxy.add_fault(
            Fault.status(503, {"Retry-After": "1"}, b"busy", method="GET", kind="blob")
        )
        blob_url = f"{proxy.url}/v2/{unique_repo}/blobs/{layer.digest}"
        async with http.get(blob_url) as resp:
            assert resp.status == 503
            assert resp.headers["Retry-After"] == "1"
            assert await resp.read() == b"busy"
        async with http.get(blob_url) as resp:  # fault used up: forwarded
            assert resp.status == 200
            assert await resp.read() == layer.data
        assert fault.hits == 1
        assert [s.fault for s in proxy.requests] == ["status", None]
        assert proxy.count("GET", "blob") == 2


async def test_counting_proxy_stream_faults(registry: RegistryProcess, unique_repo: str) -> None:
    image = make_image([200_000], "oci", raw=True)
    await push_image(registry.url, unique_repo, image, "v1")
    layer = image.layers[0]

    async with CountingProxy(registry.url) as proxy, aiohttp.ClientSession() as http:
        blob_url = f"{proxy.url}/v2/{unique_repo}/blobs/{layer.digest}"
        proxy.add_fault(Fault.corrupt(offset=70_000, kind="blob"))
        async with http.get(blob_url) as resp:
            body = await resp.read()
        assert len(body) == layer.size and body != layer.data
        assert body[70_000] == layer.data[70_000] ^ 0xFF

        proxy.add_fault(Fault.drop_after(10_000, kind="blob"))
        received = bytearray()
        with pytest.raises(aiohttp.ClientPayloadError):
            async with http.get(blob_url) as resp:
                assert resp.status == 200 and resp.content_length == layer.size
                async for chunk in resp.content.iter_any():
                    received += chunk
        assert bytes(received) == layer.data[:10_000]

        proxy.add_fault(Fault.hang(5, kind="blob"))
        with pytest.raises(TimeoutError):
            async with http.get(blob_url, timeout=aiohttp.ClientTimeout(total=0.3)) as resp:
                await resp.read()

        async with http.get(
            f"{proxy.url}/v2/{unique_repo}/manifests/v1", headers={"Accept": MANIFEST_ACCEPT}
        ) as resp:
            assert await resp.read() == image.manifest
        async with http.head(blob_url) as resp:
            assert resp.status == 200 and resp.content_length == layer.size


async def test_registry_client_and_restart(tmp_path: Path) -> None:
    image = make_image([10], "oci", seed=7)
    assert make_image([10], "oci", seed=7).digest == image.digest
    with RegistryProcess(workdir=tmp_path) as reg:
        async with RegistryClient(reg.url) as client:
            await client.push("x/y", image, "t")
        port = reg.port
        reg.restart()
        assert reg.port == port and reg.running
        async with RegistryClient(reg.url) as client:
            status, headers, body = await client.get_manifest("x/y", "t")
        assert status == 200 and body == image.manifest
        assert headers["Docker-Content-Digest"] == image.digest
    assert not reg.running


def test_classify() -> None:
    assert classify("/v2/") == ("base", None, None)
    assert classify("/v2/a/b/blobs/sha256:ab") == ("blob", "a/b", "sha256:ab")
    assert classify("/v2/a/blobs/uploads/") == ("upload", "a", None)
    assert classify("/v2/a/blobs/uploads/123") == ("upload", "a", "123")
    assert classify("/v2/a/b/c/manifests/latest") == ("manifest", "a/b/c", "latest")
    assert classify("/v2/a/tags/list") == ("tags", "a", None)
    assert classify("/v2/a/referrers/sha256:ab") == ("referrers", "a", "sha256:ab")
    assert classify("/v2/_catalog") == ("catalog", None, None)


async def test_registry_proxy_mode_reference_peer(
    registry: RegistryProcess, unique_repo: str, tmp_path: Path
) -> None:
    image = make_image([3000, 4000], "oci")
    await push_image(registry.url, unique_repo, image, "v1")

    async with (
        CountingProxy(registry.url) as upstream,
        RegistryProcess(proxy_remote_url=upstream.url, workdir=tmp_path / "mirror") as mirror,
    ):
        await skopeo_copy(f"{mirror.host}/{unique_repo}:v1", tmp_path / "first")
        _assert_copied(tmp_path / "first", image)
        fetched = {s.reference for s in upstream.matching("GET", "blob")}
        assert fetched == image.blob_digests  # (2.8.2 GETs each blob twice on a miss)

        upstream.reset()
        await skopeo_copy(f"{mirror.host}/{unique_repo}:v1", tmp_path / "second")
        _assert_copied(tmp_path / "second", image)
        assert upstream.count("GET", "blob") == 0
