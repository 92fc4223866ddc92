"""Replicas that act as one cache (issue 12): three ``mirrorcache serve`` processes with a
static peer list, each on its own cache directory, in front of one Distribution upstream
behind a counting proxy. A replica missing a digest or tag it does not own asks the owner,
which fetches once and streams; the asker tees the stream into its own cache."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from mirrorcache.cluster import signing
from mirrorcache.proxy.owners import blob_key, tag_key
from tests.support.countingproxy import CountingProxy, Fault
from tests.support.images import Image, make_image, push_image
from tests.support.mirrorcluster import (
    ACCEPT,
    SECRET,
    MirrorCluster,
    kill_owner_mid_download,
    per_blob_gets,
    pull,
    pull_everywhere,
    sha,
)
from tests.support.mirrorproc import MirrorProcess
from tests.support.registry import RegistryProcess

pytestmark = pytest.mark.integration


async def test_30_cold_pulls_over_3_replicas_fetch_each_blob_once(
        tmp_path: Path, registry: RegistryProcess, unique_repo: str) -> None:
    image = make_image([3_000_000, 1_500_000, 700_000], raw=True)
    await push_image(registry.url, unique_repo, image, "v1")
    async with CountingProxy(registry.url) as proxy, \
            MirrorCluster(tmp_path / "c", proxy.url) as cluster, \
            aiohttp.ClientSession() as http:
        # A slowish upstream (10 ms per 64 KiB), so the pulls overlap the fetches.
        proxy.add_fault(Fault.slow(0.01, method="GET", kind="blob", times=None))
        want = [image.digest, *(b.digest for b in image.blobs)]
        await pull_everywhere(cluster, http, unique_repo, image, tmp_path)
        assert per_blob_gets(proxy, image) == {b.digest: 1 for b in image.blobs}
        assert proxy.count("GET", "manifest") == 1
        assert proxy.count("HEAD", "manifest") == 1
        # Every replica now holds its own verified copy: a second round is all cache.
        proxy.reset()
        for r in cluster.replicas:
            assert await pull(http, r, unique_repo, "v1", image) == want
        assert proxy.count("GET", "blob") == 0
        # ... because every replica teed what it streamed into its own cache directory.
        for r in cluster.replicas:
            for b in image.blobs:
                hexd = b.digest.removeprefix("sha256:")
                stored = r.workdir / "cache" / "blobs" / "sha256" / hexd[:2] / hexd
                assert sha(stored.read_bytes()) == b.digest
        # The non-owners asked the owners: peer requests happened and none fell back.
        ok = [await cluster.metric(r, "mirrorcache_peer_requests_total", result="ok")
              for r in cluster.replicas]
        assert sum(ok) >= 2 * len(image.blobs)
        assert sum([await cluster.metric(r, "mirrorcache_peer_fallbacks_total")
                    for r in cluster.replicas]) == 0


async def test_peer_endpoint_needs_the_secret_and_is_not_reachable_from_v2(
        tmp_path: Path, registry: RegistryProcess, unique_repo: str) -> None:
    image = make_image([50_000], raw=True)
    await push_image(registry.url, unique_repo, image, "v1")
    blob = image.layers[0]
    async with CountingProxy(registry.url) as proxy, \
            MirrorCluster(tmp_path / "c", proxy.url, n=2) as cluster, \
            aiohttp.ClientSession() as http:
        r = cluster.replicas[0]
        path = (f"/_mirrorcache/peer/v1/blobs/{blob.digest}?upstream=docker.io"
                f"&repository={unique_repo.replace('/', '%2F')}")
        url = f"{r.url}{path}"
        # No signature, a wrong secret, a stale timestamp, a signature for another repo.
        forged = [
            {},
            signing.headers("x" * 32, "GET", path, time.time()),
            signing.headers(SECRET, "GET", path, time.time() - 120),
            signing.headers(SECRET, "GET", path.replace(unique_repo.replace("/", "%2F"),
                                                        "other%2Frepo"), time.time()),
            {signing.TIME_HEADER: str(int(time.time())), signing.SIGNATURE_HEADER: "0" * 64},
        ]
        for headers in forged:
            async with http.get(yarl_url(url), headers=headers) as resp:
                assert resp.status == 401
                assert (await resp.json())["errors"][0]["code"] == "UNAUTHORIZED"
        # The right signature works (the owner's own single-flight fetches it).
        async with http.get(yarl_url(url),
                            headers=signing.headers(SECRET, "GET", path, time.time())) as resp:
            assert resp.status == 200
            assert sha(await resp.read()) == blob.digest
        served = await cluster.metric(r, "mirrorcache_peer_served_total")
        assert served == 1
        # The owner's repository rule decides what the asker names: the blob is cached now,
        # but another repository that upstream says lacks it does not get it.
        await push_image(registry.url, unique_repo + "-other", make_image([1000], raw=True),
                         "v1")
        elsewhere = path.replace(unique_repo.replace("/", "%2F"),
                                 (unique_repo + "-other").replace("/", "%2F"))
        async with http.get(yarl_url(f"{r.url}{elsewhere}"),
                            headers=signing.headers(SECRET, "GET", elsewhere,
                                                    time.time())) as resp:
            assert resp.status == 404
            assert (await resp.json())["errors"][0]["code"] == "BLOB_UNKNOWN"
        served += 1
        # The public routes never turn into peer requests, forged headers or not.
        good = signing.headers(SECRET, "GET", path, time.time())
        for public in (f"/v2/..{path}", f"/v2/_mirrorcache/peer/v1/blobs/{blob.digest}",
                       f"/v2/%2e%2e{path}", f"/v2/{unique_repo}/..{path}"):
            async with http.get(yarl_url(r.url + public), headers=good) as resp:
                body = await resp.read()
                assert resp.status in (400, 404), (public, resp.status)
                assert sha(body) != blob.digest
        assert await cluster.metric(r, "mirrorcache_peer_served_total") == served
        # A client's blob request with peer headers is a plain client request.
        proxy.reset()
        other = make_image([60_000], raw=True)
        await push_image(registry.url, unique_repo, other, "v2")
        layer = other.layers[0]
        owner = cluster.owner(blob_key(layer.digest))
        asker = next(x for x in cluster.replicas if x is not owner)
        p2 = f"/v2/{unique_repo}/blobs/{layer.digest}"
        async with http.get(f"{asker.url}{p2}",
                            headers=signing.headers(SECRET, "GET", p2, time.time())) as resp:
            assert resp.status == 200 and sha(await resp.read()) == layer.digest
        # ... so the non-owner still asked the owner, which fetched it once.
        assert await cluster.metric(owner, "mirrorcache_peer_served_total", kind="blob") >= 1
        assert per_blob_gets(proxy, other)[layer.digest] == 1


def yarl_url(url: str) -> object:
    import yarl

    return yarl.URL(url, encoded=True)


async def test_tag_revalidation_after_ttl_asked_of_all_three_is_one_head(
        tmp_path: Path, registry: RegistryProcess, unique_repo: str) -> None:
    image = make_image([10_000], raw=True)
    await push_image(registry.url, unique_repo, image, "v1")
    ttl = 1.0
    async with CountingProxy(registry.url) as proxy, \
            MirrorCluster(tmp_path / "c", proxy.url, upstream={"tag_ttl": f"{ttl}s"}
                          ) as cluster, aiohttp.ClientSession() as http:

        async def tag(r: MirrorProcess) -> bytes:
            async with http.get(f"{r.url}/v2/{unique_repo}/manifests/v1",
                                headers={"Accept": ACCEPT}) as resp:
                assert resp.status == 200
                return await resp.read()

        assert await asyncio.gather(*(tag(r) for r in cluster.replicas)) == \
            [image.manifest] * 3
        assert (proxy.count("HEAD", "manifest"), proxy.count("GET", "manifest")) == (1, 1)
        # The records must really be past their TTL: a subprocess has no injectable clock.
        await asyncio.sleep(ttl + 0.2)
        proxy.reset()
        got = await asyncio.gather(*(tag(r) for r in cluster.replicas * 3))
        assert got == [image.manifest] * 9
        assert proxy.count("HEAD", "manifest") == 1
        assert proxy.count("GET", "manifest") == 0
        owner = cluster.owner(tag_key("docker.io", unique_repo, "v1"))
        assert await cluster.metric(owner, "mirrorcache_peer_served_total",
                                    kind="manifest") >= 4  # 2 askers, twice


async def test_owner_killed_mid_download_replicas_fall_back_to_upstream(
        tmp_path: Path, registry: RegistryProcess, unique_repo: str) -> None:
    image = make_image([8 << 20], raw=True)
    layer = image.layers[0]
    await push_image(registry.url, unique_repo, image, "v1")
    async with CountingProxy(registry.url) as proxy, \
            MirrorCluster(tmp_path / "c", proxy.url) as cluster, \
            aiohttp.ClientSession() as http:
        others, bodies, gets = await kill_owner_mid_download(
            cluster, proxy, http, unique_repo, layer.digest, "cache")
        assert bodies == [layer.digest] * 6
        # The owner's one GET, then one Range resume per surviving replica.
        print(f"\nowner killed mid-download: {gets} upstream GETs ({gets - 1} extra, resumes)")
        assert gets == 1 + len(others)
        for r in others:
            assert await cluster.metric(r, "mirrorcache_peer_fallbacks_total") == 1
            hexd = layer.digest.removeprefix("sha256:")
            stored = r.workdir / "cache" / "blobs" / "sha256" / hexd[:2] / hexd
            assert sha(stored.read_bytes()) == layer.digest
        # The dead owner is left out of ownership and pulls keep working.
        await cluster.wait_healthy(others, count=2)
        more = make_image([40_000] * 4, raw=True)
        await push_image(registry.url, unique_repo, more, "v2")
        proxy.reset()
        got = await asyncio.gather(*(pull(http, r, unique_repo, "v2", more)
                                     for r in others * 2))
        assert got == [[more.digest, *(b.digest for b in more.blobs)]] * 4
        assert per_blob_gets(proxy, more) == {b.digest: 1 for b in more.blobs}


def image_with_blobs_owned_by(cluster: MirrorCluster, member: MirrorProcess) -> Image:
    rng = random.Random(7)
    while True:
        image = make_image([rng.randrange(20_000, 60_000) for _ in range(6)], raw=True)
        if sum(cluster.owner(blob_key(b.digest)) is member for b in image.blobs) >= 2:
            return image


@pytest.mark.parametrize("how", ["sighup", "stopped"])
async def test_member_removed_or_stopped_its_keys_move(
        tmp_path: Path, registry: RegistryProcess, unique_repo: str, how: str) -> None:
    async with CountingProxy(registry.url) as proxy, \
            MirrorCluster(tmp_path / "c", proxy.url) as cluster, \
            aiohttp.ClientSession() as http:
        gone = cluster.replicas[2]
        rest = cluster.replicas[:2]
        image = image_with_blobs_owned_by(cluster, gone)
        await push_image(registry.url, unique_repo, image, "v1")
        if how == "sighup":
            cluster.write_configs([r.host for r in rest], only=rest)
            for r in rest:
                r.signal(signal.SIGHUP)
        else:
            await gone.stop()
        await cluster.wait_healthy(rest, count=2)
        if how == "sighup":
            for r in rest:
                assert r.events("cluster.members_changed")[-1]["removed"] == [gone.host]
        got = await asyncio.gather(*(pull(http, r, unique_repo, "v1", image)
                                     for r in rest * 3))
        assert got == [[image.digest, *(b.digest for b in image.blobs)]] * 6
        assert per_blob_gets(proxy, image) == {b.digest: 1 for b in image.blobs}
        assert proxy.count("GET", "manifest") == 1
        # The blobs the removed member owned moved to the two left; nobody asked it.
        for r in rest:
            assert await cluster.metric(r, "mirrorcache_peer_fallbacks_total") == 0
        if how == "sighup":
            assert await cluster.metric(gone, "mirrorcache_peer_served_total") == 0
            return
        # `mirrorcache cluster status` sees the stopped member and names the owners.
        moved = next(b for b in image.blobs if cluster.owner(blob_key(b.digest)) is gone)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mirrorcache", "cluster", "status", "--config",
            str(rest[0].config_path), "--json", moved.digest,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
        assert proc.returncode == 1, err.decode()  # one member unhealthy
        doc = json.loads(out)
        assert {m["member"]: m["healthy"] for m in doc["members"]} == {
            rest[0].host: True, rest[1].host: True, gone.host: False}
        blob_owner = next(o for o in doc["owners"] if o["of"] == "blob")
        assert blob_owner["owner_if_all_healthy"] == gone.host
        assert blob_owner["owner"] == cluster.owner(blob_key(moved.digest), rest).host


async def test_owner_serving_stale_is_not_trusted_for_a_ttl(
        tmp_path: Path, registry: RegistryProcess, unique_repo: str) -> None:
    image = make_image([10_000], raw=True)
    await push_image(registry.url, unique_repo, image, "v1")
    ttl = 1.0
    async with CountingProxy(registry.url) as proxy, \
            MirrorCluster(tmp_path / "c", proxy.url, upstream={
                "tag_ttl": f"{ttl}s", "max_retries": 0}) as cluster, \
            aiohttp.ClientSession() as http:

        async def tag(r: MirrorProcess) -> tuple[int, bytes, str | None]:
            async with http.get(f"{r.url}/v2/{unique_repo}/manifests/v1",
                                headers={"Accept": ACCEPT}) as resp:
                return resp.status, await resp.read(), resp.headers.get("Warning")

        for r in cluster.replicas:
            assert (await tag(r))[:2] == (200, image.manifest)
        await asyncio.sleep(ttl + 0.2)  # past the TTL (no injectable clock in a subprocess)
        proxy.add_fault(Fault.status(503, method="HEAD", kind="manifest", times=None))
        owner = cluster.owner(tag_key("docker.io", unique_repo, "v1"))
        others = [r for r in cluster.replicas if r is not owner]
        for r in others:
            status, body, warning = await tag(r)
            assert (status, body) == (200, image.manifest)
            assert warning is not None and "stale" in warning
            # The owner answered stale: this replica asked upstream itself, and failed too.
            assert await cluster.metric(r, "mirrorcache_peer_requests_total",
                                        kind="manifest", result="stale") == 1
