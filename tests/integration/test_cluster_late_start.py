"""A replica that starts after its peer already probed it and marked it down: until the
peer's next probe the two disagree on owners. Pulls through both must still all succeed
(some blobs fetched twice is the accepted price), never a 500."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.countingproxy import CountingProxy, Fault
from tests.support.images import make_image, push_image
from tests.support.mirrorcluster import MirrorCluster
from tests.support.registry import RegistryProcess
from tests.support.s3server import REGION, MotoServer, aws_env, make_bucket
from tests.support.skopeo import skopeo_copy
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("store", ["filesystem", "s3"])
async def test_late_second_replica_pulls_concurrently_without_500(
        tmp_path: Path, registry: RegistryProcess, unique_repo: str, store: str,
        request: pytest.FixtureRequest) -> None:
    image = make_image([400_000, 300_000, 200_000, 150_000, 100_000, 80_000, 60_000,
                        40_000], raw=True)
    await push_image(registry.url, unique_repo, image, "v1")
    async with CountingProxy(registry.url) as proxy, aiohttp.ClientSession() as http:
        proxy.add_fault(Fault.slow(0.01, method="GET", kind="blob", times=None))
        kw: dict[str, Any] = {}
        if store == "s3":
            moto: MotoServer = request.getfixturevalue("moto_server")
            bucket = await make_bucket(moto)

            def s3(workdir: Path) -> dict[str, Any]:
                return {"s3": {"bucket": bucket, "endpoint_url": moto.url, "region": REGION,
                               "addressing_style": "path",
                               "local_cache": {"path": str(workdir / "tier"),
                                               "max_size": "1GiB"}},
                        "metadata_path": str(workdir / "meta")}
            kw = {"storage": s3, "env": aws_env()}
        cluster = MirrorCluster(tmp_path / "c", proxy.url, n=2, probe_interval="30s", **kw)
        first, second = cluster.replicas
        try:
            await first.start()
            # The first replica's first probe found the second not running: down.
            await wait_until(lambda: first.events("cluster.member_down"), timeout=10)
            await second.start()

            async def get(r_url: str, digest: str) -> tuple[int, str, str]:
                async with http.get(f"{r_url}/v2/{unique_repo}/blobs/{digest}") as resp:
                    body = await resp.read()
                    return resp.status, sha(body), body[:300].decode(errors="replace")

            jobs = [get(r.url, b.digest) for _ in range(3) for b in image.blobs
                    for r in (first, second)]
            copies = [skopeo_copy(f"docker://{r.host}/{unique_repo}:v1", tmp_path / f"s{i}")
                      for i, r in enumerate((first, second))]
            results, copied = await asyncio.gather(asyncio.gather(*jobs),
                                                   asyncio.gather(*copies))
            for copy in copied:
                for b in image.blobs:
                    assert sha((copy.dest_dir / b.digest.split(":")[1]).read_bytes()) \
                        == b.digest
            want = [b.digest for _ in range(3) for b in image.blobs for _r in range(2)]
            assert [s for s, _, _ in results] == [200] * len(jobs), results
            assert [d for _, d, _ in results] == want
            # Each blob reached upstream at most once per replica.
            for b in image.blobs:
                gets = [s for s in proxy.matching("GET", "blob") if s.path.endswith(b.digest)]
                assert 1 <= len(gets) <= 2, (b.digest, len(gets))
            for r in cluster.replicas:
                for name in ("request.server_error", "request.unhandled_error",
                             "http.protocol_error", "blob.fetch_crashed"):
                    assert r.events(name) == [], (r.host, name)
                blobs = [e for e in r.events("request.finished")
                         if "/blobs/" in e["path"] and e.get("route") != "peer"]
                assert blobs and {e["status"] for e in blobs} == {200}
        finally:
            for r in cluster.replicas:
                if r.proc is not None and r.proc.poll() is None:
                    await r.stop()
