"""The S3 backend end to end: real mirrorcache processes, moto's server, skopeo, a real registry.

Every process gets the fake AWS credentials through its environment (the default chain),
its own local tier, and a bucket of its test's own.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.countingproxy import CountingProxy, Fault
from tests.support.images import Image, make_image, push_image
from tests.support.mirror import mirror_config
from tests.support.mirrorproc import MirrorProcess
from tests.support.registry import RegistryProcess
from tests.support.s3server import (
    REGION,
    MotoServer,
    aws_env,
    aws_session,
    make_bucket,
    s3_raw_config,
)
from tests.support.skopeo import copied_blob_digests, manifest_digest, skopeo_copy
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

MiB = 1 << 20


def s3_mirror(tmp_path: Path, name: str, moto: MotoServer, bucket: str, upstream: str,
              *, tier: bool = True, **s3: Any) -> MirrorProcess:
    """A mirrorcache process on ``bucket`` with its own local tier under ``tmp_path/name``."""
    raw = mirror_config(tmp_path / name, {"docker.io": {"url": upstream}})
    section = s3_raw_config(moto, bucket, part_size="5MiB", **s3)
    if tier:
        section["local_cache"] = {"path": str(tmp_path / name / "tier"), "max_size": "1GiB"}
    raw["storage"] = {"s3": section, "metadata_path": str(tmp_path / name / "meta")}
    return MirrorProcess(raw, tmp_path / name / "proc", env=aws_env())


async def s3_state(moto: MotoServer, bucket: str) -> tuple[list[str], list[str]]:
    """(object keys under blobs/, keys of pending multipart uploads) in ``bucket``."""
    async with aws_session().create_client("s3", endpoint_url=moto.url,
                                           region_name=REGION) as s3:
        objs = await s3.list_objects_v2(Bucket=bucket, Prefix="blobs/")
        ups = await s3.list_multipart_uploads(Bucket=bucket)
    return ([o["Key"] for o in objs.get("Contents", [])],
            [u["Key"] for u in ups.get("Uploads", [])])


async def poll(cond: Callable[[], Awaitable[bool]], *, timeout: float, what: str) -> None:
    """Wait (polled, with a deadline) for an async condition."""
    deadline = time.monotonic() + timeout
    while not await cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(0.05)


def blob_key(digest: str) -> str:
    hexpart = digest.split(":", 1)[1]
    return f"blobs/sha256/{hexpart[:2]}/{hexpart}"


async def pull(m: MirrorProcess, repo: str, dest: Path, img: Image) -> None:
    copy = await skopeo_copy(f"{m.host}/{repo}:v1", dest)
    assert manifest_digest(copy.dest_dir) == img.digest
    assert copied_blob_digests(copy.dest_dir) == img.blob_digests


@pytest.fixture
async def upstream(registry: RegistryProcess) -> AsyncIterator[CountingProxy]:
    async with CountingProxy(registry.url) as proxy:
        yield proxy


async def test_replicas_share_the_bucket_and_a_fresh_one_serves_with_upstream_down(
        tmp_path: Path, registry: RegistryProcess, moto_server: MotoServer,
        unique_repo: str) -> None:
    img = make_image([6 * MiB + 3, 40_000], media="oci", raw=True)  # one multipart layer
    await push_image(registry.url, unique_repo, img, "v1")
    bucket = await make_bucket(moto_server)
    proxy = await CountingProxy(registry.url).start()
    try:
        async with s3_mirror(tmp_path, "a", moto_server, bucket, proxy.url) as a:
            await pull(a, unique_repo, tmp_path / "pull-a", img)
        assert proxy.count("GET", "blob") == len(img.blob_digests)
        keys, pending = await s3_state(moto_server, bucket)
        assert sorted(keys) == sorted(blob_key(d) for d in img.blob_digests | {img.digest})
        assert pending == []

        # A second replica: its own (empty) local tier, the same bucket. No blob upstream.
        proxy.reset()
        async with s3_mirror(tmp_path, "b", moto_server, bucket, proxy.url) as b:
            await pull(b, unique_repo, tmp_path / "pull-b", img)
            hits = [e["cache"] for e in b.events("request.finished")
                    if "/blobs/" in e["path"] and e["method"] == "GET"]
        assert proxy.count("GET", "blob") == 0
        assert hits and set(hits) == {"hit"}
    finally:
        await proxy.close()

    # Upstream gone: a fresh process (new local tier, new metadata dir) on the same bucket
    # still answers the tag from the tag record in S3.
    async with s3_mirror(tmp_path, "c", moto_server, bucket, proxy.url) as c:
        await pull(c, unique_repo, tmp_path / "pull-c", img)


async def test_killed_during_a_multipart_upload_then_the_janitor_aborts_it(
        tmp_path: Path, registry: RegistryProcess, upstream: CountingProxy,
        moto_server: MotoServer, unique_repo: str) -> None:
    img = make_image([16 * MiB], media="oci", raw=True)
    layer = img.layers[0]
    await push_image(registry.url, unique_repo, img, "v1")
    bucket = await make_bucket(moto_server)
    upstream.add_fault(Fault.slow(0.02, kind="blob", method="GET", times=None))
    a = s3_mirror(tmp_path, "a", moto_server, bucket, upstream.url)
    await a.start()
    try:
        async with aiohttp.ClientSession() as http:
            get = asyncio.ensure_future(http.get(
                f"{a.url}/v2/{unique_repo}/blobs/{layer.digest}"))
            await poll(lambda: _has_pending(moto_server, bucket), timeout=60,
                       what="a multipart upload in progress")
            a.kill_all()
            with pytest.raises((aiohttp.ClientError, ConnectionError)):
                resp = await get
                await resp.read()
    finally:
        a.kill_all()
    keys, pending = await s3_state(moto_server, bucket)
    assert keys == [] and pending == [blob_key(layer.digest)]  # nothing under the blob key

    upstream.faults.clear()
    async with s3_mirror(tmp_path, "a", moto_server, bucket, upstream.url,
                         stale_upload_age="0s") as b:
        await poll(lambda: _no_pending(moto_server, bucket), timeout=20,
                   what="the stale upload aborted")
        assert [e["uploads"] for e in b.events("storage.s3_uploads_aborted")] == [1]
        # and the blob is fetched again, whole
        async with aiohttp.ClientSession() as http, http.get(
                f"{b.url}/v2/{unique_repo}/blobs/{layer.digest}") as resp:
            body = await resp.read()
        assert resp.status == 200 and hashlib.sha256(body).hexdigest() == layer.digest[7:]
        await poll(lambda: _objects_are(moto_server, bucket, [blob_key(layer.digest)]),
                   timeout=30, what="the blob committed")


async def _has_pending(moto: MotoServer, bucket: str) -> bool:
    return bool((await s3_state(moto, bucket))[1])


async def _no_pending(moto: MotoServer, bucket: str) -> bool:
    return not (await s3_state(moto, bucket))[1]


async def _objects_are(moto: MotoServer, bucket: str, keys: list[str]) -> bool:
    return (await s3_state(moto, bucket))[0] == keys


async def test_digest_mismatch_aborts_the_upload(
        tmp_path: Path, registry: RegistryProcess, upstream: CountingProxy,
        moto_server: MotoServer, unique_repo: str) -> None:
    img = make_image([12 * MiB], media="oci", raw=True)
    layer = img.layers[0]
    await push_image(registry.url, unique_repo, img, "v1")
    bucket = await make_bucket(moto_server)
    upstream.add_fault(Fault.corrupt(11 * MiB, kind="blob", method="GET"))
    async with s3_mirror(tmp_path, "a", moto_server, bucket, upstream.url) as m:
        async with aiohttp.ClientSession() as http:
            with pytest.raises(aiohttp.ClientPayloadError):
                async with http.get(f"{m.url}/v2/{unique_repo}/blobs/{layer.digest}") as resp:
                    assert resp.status == 200
                    await resp.read()  # cut short: the last byte is never sent
        await poll(lambda: _wait_event(m, "blob.digest_mismatch"), timeout=20,
                   what="the mismatch logged")
        keys, pending = await s3_state(moto_server, bucket)
        assert keys == [] and pending == []
        assert list((tmp_path / "a" / "tier" / "tmp").glob("*.part")) == []
    assert upstream.count("GET", "blob") == 1


async def _wait_event(m: MirrorProcess, name: str) -> bool:
    return bool(m.events(name))


async def test_redirect_mode_follows_to_s3_and_checks_access_first(
        tmp_path: Path, registry: RegistryProcess, upstream: CountingProxy,
        moto_server: MotoServer, unique_repo: str) -> None:
    img = make_image([300_000, 20_000], media="oci", raw=True)
    await push_image(registry.url, unique_repo, img, "v1")
    await push_image(registry.url, "blocked/app", img, "v1")
    bucket = await make_bucket(moto_server)
    m = s3_mirror(tmp_path, "a", moto_server, bucket, upstream.url, tier=False,
                  redirect=True, redirect_expiry="60s")
    raw_policy = {"rules": [{"deny": "docker.io/blocked/**"}], "default": "allow"}
    import yaml
    cfg = yaml.safe_load(m.config_path.read_text())
    cfg["policy"] = raw_policy
    m.config_path.write_text(yaml.safe_dump(cfg))
    async with m:
        await pull(m, unique_repo, tmp_path / "cold", img)  # a miss streams (and caches)
        upstream.reset()
        await pull(m, unique_repo, tmp_path / "warm", img)  # hits: 307 to S3
        assert upstream.count("GET", "blob") == 0
        redirects = [e for e in m.events("request.finished")
                     if e["cache"] == "redirect" and e["status"] == 307]
        assert len(redirects) == len(img.blob_digests)
        layer = img.layers[0]
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{m.url}/v2/{unique_repo}/blobs/{layer.digest}",
                                allow_redirects=False) as resp:
                assert resp.status == 307
                location = resp.headers["Location"]
            assert location.startswith(f"{moto_server.url}/{bucket}/blobs/sha256/")
            assert "X-Amz-Expires=60" in location
            async with http.get(location) as resp:
                assert resp.status == 200
                assert hashlib.sha256(await resp.read()).hexdigest() == layer.digest[7:]
            # the policy is applied before any redirect: denied, not redirected
            async with http.get(f"{m.url}/v2/blocked/app/blobs/{layer.digest}",
                                allow_redirects=False) as resp:
                body = await resp.json()
            assert resp.status == 403 and body["errors"][0]["code"] == "DENIED"
            # and the repository gate: a cached blob another repository never had is 404
            await push_image(registry.url, f"{unique_repo}-other",
                             make_image([1000], media="oci", raw=True), "v1")
            async with http.get(f"{m.url}/v2/{unique_repo}-other/blobs/{layer.digest}",
                                allow_redirects=False) as resp:
                body = await resp.json()
            assert resp.status == 404 and body["errors"][0]["code"] == "BLOB_UNKNOWN"


async def test_readyz_fails_while_s3_is_down_and_pulls_bypass(
        tmp_path: Path, registry: RegistryProcess, upstream: CountingProxy,
        unique_repo: str) -> None:
    img = make_image([200_000], media="oci", raw=True)
    later = make_image([150_000], media="oci", raw=True, seed=7)
    await push_image(registry.url, unique_repo, img, "v1")
    await push_image(registry.url, f"{unique_repo}-later", later, "v1")
    moto = MotoServer().start()
    try:
        bucket = await make_bucket(moto)
        async with s3_mirror(tmp_path, "a", moto, bucket, upstream.url) as m, \
                aiohttp.ClientSession() as http:
            async with http.get(f"{m.url}/readyz") as resp:
                assert resp.status == 200
            await pull(m, unique_repo, tmp_path / "before", img)
            moto.close()
            async with http.get(f"{m.url}/readyz") as resp:
                body = await resp.json()
            assert resp.status == 503 and body["status"] == "degraded"
            assert body["reason"].startswith("S3 bucket unreachable")
            async with http.get(f"{m.url}/healthz") as resp:
                assert resp.status == 200
            upstream.reset()
            copy = await skopeo_copy(f"{m.host}/{unique_repo}-later:v1", tmp_path / "during")
            assert manifest_digest(copy.dest_dir) == later.digest
            assert copied_blob_digests(copy.dest_dir) == later.blob_digests
            assert upstream.count("GET", "blob") == len(later.blob_digests)
            caches = {e["cache"] for e in m.events("request.finished")
                      if e["path"].startswith(f"/v2/{unique_repo}-later/blobs/")}
            assert "bypass" in caches
            assert m.proc is not None and m.proc.poll() is None  # still up
    finally:
        moto.close()


async def test_verified_bytes_are_served_while_s3_still_publishes(
        tmp_path: Path, registry: RegistryProcess, upstream: CountingProxy,
        moto_server: MotoServer, unique_repo: str) -> None:
    img = make_image([3 * MiB], media="oci", raw=True)  # below one part: one PutObject
    layer = img.layers[0]
    await push_image(registry.url, unique_repo, img, "v1")
    bucket = await make_bucket(moto_server)
    gate = asyncio.Event()
    async with CountingProxy(moto_server.url) as s3:
        held = s3.add_fault(Fault.hold(gate, method="PUT", path="/blobs/"))
        try:
            async with s3_mirror(tmp_path, "a", moto_server, bucket, upstream.url,
                                 endpoint_url=s3.url) as m, aiohttp.ClientSession() as http:
                async with http.get(f"{m.url}/v2/{unique_repo}/blobs/{layer.digest}") as resp:
                    body = await asyncio.wait_for(resp.read(), 30)
                assert resp.status == 200
                assert hashlib.sha256(body).hexdigest() == layer.digest[7:]
                await wait_until(lambda: held.hits == 1, timeout=20, what="the PutObject held")
                assert (await s3_state(moto_server, bucket))[0] == []
                gate.set()
                await poll(lambda: _objects_are(moto_server, bucket, [blob_key(layer.digest)]),
                           timeout=20, what="the blob published")
        finally:
            gate.set()  # never leave the held request (and the proxy's shutdown) hanging
