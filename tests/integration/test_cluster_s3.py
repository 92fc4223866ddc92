"""Replicas over one shared S3 bucket (issues 11 + 12): three ``mirrorcache serve`` processes
with a static peer list, ONE moto bucket behind a counting proxy (every S3 call counted) and a
local tier each, in front of one Distribution upstream behind another counting proxy.

The owner of a digest fetches it once and publishes it in S3; the others tee its stream to
their clients and their local tier only (no second upload). Committed content is served from
S3 or the local tier without asking the owner; tag records are shared through S3."""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote

import aiohttp
import pytest

from mirrorcache.proxy.owners import blob_key, manifest_key, tag_key
from tests.support.countingproxy import CountingProxy, Fault
from tests.support.images import Image, make_image, push_image
from tests.support.mirrorcluster import (
    ACCEPT,
    MirrorCluster,
    kill_owner_mid_download,
    per_blob_gets,
    pull,
    pull_everywhere,
    sha,
)
from tests.support.mirrorproc import MirrorProcess
from tests.support.registry import RegistryProcess
from tests.support.s3server import REGION, MotoServer, aws_env, aws_session, make_bucket
from tests.support.skopeo import skopeo_copy
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

MiB = 1 << 20


def s3_key(digest: str) -> str:
    hexd = digest.removeprefix("sha256:")
    return f"blobs/sha256/{hexd[:2]}/{hexd}"


class SharedBucket:
    """One moto bucket behind a counting proxy, and what was written to it."""

    def __init__(self, moto: MotoServer, bucket: str, proxy: CountingProxy) -> None:
        self.moto = moto
        self.bucket = bucket
        self.proxy = proxy

    def storage(self, **extra: Any) -> Callable[[Path], dict[str, Any]]:
        def section(workdir: Path) -> dict[str, Any]:
            return {"s3": {"bucket": self.bucket, "endpoint_url": self.proxy.url,
                           "region": REGION, "addressing_style": "path", "part_size": "5MiB",
                           "local_cache": {"path": str(workdir / "tier"), "max_size": "1GiB"},
                           **extra},
                    "metadata_path": str(workdir / "meta")}
        return section

    def creations(self, prefix: str = "blobs/") -> Counter[str]:
        """Objects created per key: PutObject, or CompleteMultipartUpload."""
        made: Counter[str] = Counter()
        for seen in self.proxy.requests:
            key = unquote(seen.path).removeprefix(f"/{self.bucket}/")
            if not key.startswith(prefix):
                continue
            q = parse_qs(seen.query, keep_blank_values=True)
            if (seen.method == "PUT" and "uploadId" not in q) or \
                    (seen.method == "POST" and "uploadId" in q):
                made[key] += 1
        return made

    def uploads_started(self) -> int:
        """CreateMultipartUpload calls under blobs/."""
        return len([s for s in self.proxy.requests if s.method == "POST"
                    and "uploads" in parse_qs(s.query, keep_blank_values=True)
                    and f"/{self.bucket}/blobs/" in unquote(s.path)])

    async def objects(self) -> dict[str, bytes]:
        """Every object under blobs/ and its content (straight from moto)."""
        async with aws_session().create_client("s3", endpoint_url=self.moto.url,
                                               region_name=REGION) as s3:
            listed = await s3.list_objects_v2(Bucket=self.bucket, Prefix="blobs/")
            out: dict[str, bytes] = {}
            for obj in listed.get("Contents", []):
                got = await s3.get_object(Bucket=self.bucket, Key=obj["Key"])
                async with got["Body"] as body:
                    out[obj["Key"]] = await body.read()
        return out

    async def wait_for(self, digests: list[str], timeout: float = 30.0) -> dict[str, bytes]:
        deadline = asyncio.get_running_loop().time() + timeout
        want = {s3_key(d) for d in digests}
        while True:
            objs = await self.objects()
            if want <= set(objs):
                return objs
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"missing in S3: {sorted(want - set(objs))}")
            await asyncio.sleep(0.1)


def assert_every_object_hashes_to_its_key(objs: dict[str, bytes]) -> None:
    for key, body in objs.items():
        assert key.rsplit("/", 1)[1] == hashlib.sha256(body).hexdigest(), key


@pytest.fixture
async def shared(moto_server: MotoServer) -> AsyncIterator[SharedBucket]:
    bucket = await make_bucket(moto_server)
    async with CountingProxy(moto_server.url) as proxy:
        yield SharedBucket(moto_server, bucket, proxy)


@pytest.fixture
async def upstream(registry: RegistryProcess) -> AsyncIterator[CountingProxy]:
    async with CountingProxy(registry.url) as proxy:
        yield proxy


def s3_cluster(tmp_path: Path, proxy: CountingProxy, shared: SharedBucket, *,
               s3: dict[str, Any] | None = None, **kw: Any) -> MirrorCluster:
    return MirrorCluster(tmp_path / "c", proxy.url, storage=shared.storage(**(s3 or {})),
                         env=aws_env(), **kw)


async def peer_requests(cluster: MirrorCluster, **labels: str) -> list[float]:
    return [await cluster.metric(r, "mirrorcache_peer_requests_total", **labels)
            for r in cluster.replicas]


async def peer_served(cluster: MirrorCluster) -> list[float]:
    return [await cluster.metric(r, "mirrorcache_peer_served_total") for r in cluster.replicas]


def image_not_owned_by(cluster: MirrorCluster, member: MirrorProcess, repo: str
                       ) -> tuple[Image, str]:
    """An image and a tag none of whose keys (blobs, manifest, tag) ``member`` owns."""
    rng = random.Random(11)
    for n in range(1000):
        tag = f"v{n + 2}"
        image = make_image([rng.randrange(20_000, 100_000) for _ in range(2)], raw=True,
                           seed=n)
        keys = [blob_key(b.digest) for b in image.blobs] + [
            manifest_key(image.digest), tag_key("docker.io", repo, tag)]
        if all(cluster.owner(k) is not member for k in keys):
            return image, tag
    raise AssertionError("no such image")


async def test_30_cold_pulls_one_upstream_get_and_one_s3_object_per_blob(
        tmp_path: Path, registry: RegistryProcess, upstream: CountingProxy,
        shared: SharedBucket, unique_repo: str) -> None:
    image = make_image([6 * MiB, 1_500_000, 700_000], raw=True)  # 6 MiB: a multipart upload
    await push_image(registry.url, unique_repo, image, "v1")
    async with s3_cluster(tmp_path, upstream, shared) as cluster, \
            aiohttp.ClientSession() as http:
        upstream.add_fault(Fault.slow(0.01, method="GET", kind="blob", times=None))
        want = [image.digest, *(b.digest for b in image.blobs)]
        await pull_everywhere(cluster, http, unique_repo, image, tmp_path)
        assert per_blob_gets(upstream, image) == {b.digest: 1 for b in image.blobs}
        assert upstream.count("GET", "manifest") == 1
        # Exactly one S3 object written per blob (and for the manifest): the owners'.
        objs = await shared.wait_for(want)
        assert set(objs) == {s3_key(d) for d in want}
        assert_every_object_hashes_to_its_key(objs)
        assert shared.creations() == Counter({s3_key(d): 1 for d in want})
        assert shared.uploads_started() == 1  # the 6 MiB layer's multipart upload, once
        meta_puts = Counter(unquote(s.path).removeprefix(f"/{shared.bucket}/metadata/")
                            .split("/", 1)[0] for s in shared.proxy.requests
                            if s.method == "PUT" and "/metadata/" in s.path)
        print(f"\n30 cold pulls: S3 objects per blob {set(shared.creations().values())}, "
              f"metadata PUTs by kind {dict(meta_puts)}")
        # One repository link per digest and one tag record, written by the owners only.
        assert (meta_puts["links"], meta_puts["tags"]) == (len(want), 1)
        # The non-owners teed the owners' streams into their local tiers.
        assert sum(await peer_requests(cluster, result="ok")) >= 2 * len(want) - 2
        assert sum([await cluster.metric(r, "mirrorcache_peer_fallbacks_total")
                    for r in cluster.replicas]) == 0
        for r in cluster.replicas:
            for b in image.blobs:
                hexd = b.digest.removeprefix("sha256:")
                stored = r.workdir / "tier" / "blobs" / "sha256" / hexd[:2] / hexd
                assert sha(stored.read_bytes()) == b.digest

        # An image committed through two replicas is served by the third, which never saw
        # it, straight from S3: no upstream request, no peer request.
        third = cluster.replicas[2]
        other, tag2 = image_not_owned_by(cluster, third, unique_repo)
        await push_image(registry.url, unique_repo, other, tag2)
        want2 = [other.digest, *(b.digest for b in other.blobs)]
        assert await pull(http, cluster.replicas[0], unique_repo, tag2, other) == want2
        await shared.wait_for(want2)
        upstream.reset()
        shared.proxy.reset()
        asked, served = await peer_requests(cluster), await peer_served(cluster)
        assert await pull(http, third, unique_repo, tag2, other) == want2
        copy = await skopeo_copy(f"docker://{third.host}/{unique_repo}:{tag2}", tmp_path / "s2")
        for b in other.blobs:
            assert sha((copy.dest_dir / b.digest.split(":")[1]).read_bytes()) == b.digest
        assert upstream.requests == []
        assert await peer_requests(cluster) == asked
        assert await peer_served(cluster) == served
        assert shared.creations() == Counter()  # nothing written again
        assert [s.path for s in shared.proxy.requests if s.method in ("PUT", "POST")
                and "/metadata/atime/" not in unquote(s.path)] == []
        assert len([s for s in shared.proxy.requests if s.method == "GET"
                    and "/blobs/" in s.path]) >= len(other.blobs)  # it came from S3


def tag_record_puts(shared: SharedBucket) -> list[Any]:
    return [s for s in shared.proxy.requests
            if s.method == "PUT" and "/metadata/tags/" in unquote(s.path)]


async def test_tag_revalidation_is_one_head_and_the_shared_record_is_trusted(
        tmp_path: Path, registry: RegistryProcess, upstream: CountingProxy,
        shared: SharedBucket, unique_repo: str) -> None:
    image = make_image([10_000], raw=True)
    await push_image(registry.url, unique_repo, image, "v1")
    ttl, meta_ttl = 2.0, 0.2
    async with s3_cluster(tmp_path, upstream, shared, s3={"metadata_ttl": f"{meta_ttl}s"},
                          upstream={"tag_ttl": f"{ttl}s"}) as cluster, \
            aiohttp.ClientSession() as http:

        async def tag(r: MirrorProcess) -> bytes:
            async with http.get(f"{r.url}/v2/{unique_repo}/manifests/v1",
                                headers={"Accept": ACCEPT}) as resp:
                assert resp.status == 200
                return await resp.read()

        assert await asyncio.gather(*(tag(r) for r in cluster.replicas)) == \
            [image.manifest] * 3
        assert (upstream.count("HEAD", "manifest"), upstream.count("GET", "manifest")) == (1, 1)
        # Past the TTL (a subprocess has no injectable clock), asked of all 3 at once.
        await asyncio.sleep(ttl + 0.2)
        upstream.reset()
        shared.proxy.reset()
        got = await asyncio.gather(*(tag(r) for r in cluster.replicas * 3))
        assert got == [image.manifest] * 9
        assert (upstream.count("HEAD", "manifest"), upstream.count("GET", "manifest")) == (1, 0)
        # One shared tag record written, by the owner; the others only remember its answer.
        assert len(tag_record_puts(shared)) == 1
        # Past the TTL again, asked of the owner alone: it revalidates and writes the shared
        # record. The others, once their metadata_ttl copy expired, read that record from S3
        # and trust it for tag_ttl: no upstream request and no peer request.
        await asyncio.sleep(ttl + 0.2)
        owner = cluster.owner(tag_key("docker.io", unique_repo, "v1"))
        others = [r for r in cluster.replicas if r is not owner]
        upstream.reset()
        shared.proxy.reset()
        assert await tag(owner) == image.manifest
        assert upstream.count("HEAD", "manifest") == 1
        assert len(tag_record_puts(shared)) == 1
        await asyncio.sleep(meta_ttl + 0.1)
        asked = await peer_requests(cluster, kind="manifest")
        upstream.reset()
        assert await asyncio.gather(*(tag(r) for r in others * 2)) == [image.manifest] * 4
        assert upstream.requests == []
        assert await peer_requests(cluster, kind="manifest") == asked


async def test_owner_killed_mid_download_no_corrupt_object_in_s3(
        tmp_path: Path, registry: RegistryProcess, upstream: CountingProxy,
        shared: SharedBucket, unique_repo: str) -> None:
    image = make_image([8 * MiB], raw=True)
    layer = image.layers[0]
    await push_image(registry.url, unique_repo, image, "v1")
    async with s3_cluster(tmp_path, upstream, shared) as cluster, \
            aiohttp.ClientSession() as http:
        others, bodies, gets = await kill_owner_mid_download(
            cluster, upstream, http, unique_repo, layer.digest, "tier")
        assert bodies == [layer.digest] * 6
        # The owner's one GET, then one Range resume per surviving replica.
        assert gets == 1 + len(others)
        # The owner died before publishing: a survivor uploads its verified copy (each
        # checks S3 first; both may, when they finish together). Never a corrupt object.
        objs = await shared.wait_for([layer.digest])
        assert_every_object_hashes_to_its_key(objs)
        made = shared.creations()[s3_key(layer.digest)]
        assert 1 <= made <= len(others)

        def published() -> int:
            return sum(len([e for e in r.events("cluster.published_after_owner_failed")
                            if e.get("uploaded")]) for r in others)

        # A survivor logs its upload once S3 has answered: the object can be visible a moment
        # before that line reaches the log file.
        await wait_until(lambda: published() >= made, timeout=10,
                         what="every upload logged by the survivor that made it")
        assert published() == made
        print(f"\nowner killed mid-download: {gets} upstream GETs ({gets - 1} "
              f"extra, Range resumes); S3 objects written for the blob by survivors: {made}")
        # The rest is served from S3 / the tiers: a fresh pull costs no upstream GET.
        upstream.reset()
        for r in others:
            async with http.get(f"{r.url}/v2/{unique_repo}/blobs/{layer.digest}") as resp:
                assert resp.status == 200
                assert sha(await resp.read()) == layer.digest
        assert upstream.count("GET", "blob") == 0
