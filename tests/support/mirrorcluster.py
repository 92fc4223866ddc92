"""N ``mirrorcache serve`` processes forming one cluster (static peer list) on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
import yaml

from mirrorcache.cluster import hrw
from tests.support.countingproxy import CountingProxy, Fault
from tests.support.images import Image
from tests.support.mirror import mirror_config
from tests.support.mirrorproc import MirrorProcess
from tests.support.skopeo import skopeo_copy
from tests.support.waiting import wait_until

SECRET = "test-cluster-secret-0123456789abcdef"


class MirrorCluster:
    """``async with MirrorCluster(tmp, upstream_url) as c:`` -> c.replicas, all healthy."""

    def __init__(self, root: Path, upstream_url: str, n: int = 3, *,
                 upstream: dict[str, Any] | None = None, workers: int = 1,
                 storage: Callable[[Path], dict[str, Any]] | None = None,
                 env: dict[str, str] | None = None, **cluster: Any) -> None:
        """``storage(workdir)``: a replica's ``storage`` section (default: a filesystem cache
        of its own under ``workdir``); ``env``: the processes' environment (AWS credentials
        for a shared S3 store)."""
        root.mkdir(parents=True, exist_ok=True)
        self.secret_file = root / "cluster.secret"
        self.secret_file.write_text(SECRET + "\n")
        self.replicas = [MirrorProcess({}, root / f"r{i}", workers=workers, env=env)
                         for i in range(n)]
        self._storage = storage
        self._upstream = {"url": upstream_url, **(upstream or {})}
        self._cluster = {"probe_interval": "0.3s", **cluster}
        self.write_configs([r.host for r in self.replicas])

    def write_configs(self, peers: list[str], only: list[MirrorProcess] | None = None) -> None:
        for r in only or self.replicas:
            raw = mirror_config(r.workdir, {"docker.io": self._upstream})
            if self._storage is not None:
                raw["storage"] = self._storage(r.workdir)
            raw.update({"listen": r.host, "workers": r.workers,
                        "log": {"level": "info", "format": "json"},
                        "cluster": {"peers": peers, "secret_file": str(self.secret_file),
                                    **self._cluster}})
            r.config_path.write_text(yaml.safe_dump(raw))

    @property
    def hosts(self) -> list[str]:
        return [r.host for r in self.replicas]

    def owner(self, key: str, among: list[MirrorProcess] | None = None) -> MirrorProcess:
        members = among or self.replicas
        host = hrw.owner(key, [r.host for r in members])
        return next(r for r in members if r.host == host)

    async def metric(self, r: MirrorProcess, name: str, **labels: str) -> float:
        async with aiohttp.ClientSession() as http, http.get(f"{r.url}/metrics") as resp:
            text = await resp.text()
        total = 0.0
        for line in text.splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            head, _, value = line.rpartition(" ")
            metric, _, rest = head.partition("{")
            if metric != name:
                continue
            if all(f'{k}="{v}"' in rest for k, v in labels.items()):
                total += float(value)
        return total

    async def wait_healthy(self, replicas: list[MirrorProcess] | None = None,
                           count: int | None = None, timeout: float = 20.0) -> None:
        """Until every replica sees ``count`` healthy members (all by default)."""
        replicas = replicas or self.replicas
        count = count or len(replicas)
        deadline = time.monotonic() + timeout
        while True:
            seen = [await self.metric(r, "mirrorcache_cluster_members", health="healthy")
                    for r in replicas]
            if all(s == count for s in seen):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"members seen healthy: {seen}, want {count}")
            await asyncio.sleep(0.05)

    async def __aenter__(self) -> MirrorCluster:
        try:
            await asyncio.gather(*(r.start() for r in self.replicas))
            await self.wait_healthy()
        except BaseException:
            for r in self.replicas:
                if r.proc is not None and r.proc.poll() is None:
                    r.kill_all()
            raise
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        for r in self.replicas:
            if r.proc is not None and r.proc.poll() is None:
                r.kill_all() if et is not None else await r.stop()


async def kill_owner_mid_download(cluster: MirrorCluster, upstream: CountingProxy,
                                  http: aiohttp.ClientSession, repo: str, digest: str,
                                  spool: str) -> tuple[list[MirrorProcess], list[str], int]:
    """Three clients per non-owner pull ``digest`` while its owner's slow upstream fetch
    streams to them; the owner is SIGKILLed once both are receiving (their spool under
    ``<workdir>/<spool>/tmp`` past 1 MiB). Returns the survivors, the sha256 of every body
    the clients got, and how many upstream GETs of the blob there were."""
    owner = cluster.owner(f"blob:{digest}")
    others = [r for r in cluster.replicas if r is not owner]
    # The owner's upstream fetch is slow (30 ms per 64 KiB: ~4 s for 8 MiB).
    upstream.add_fault(Fault.slow(0.03, method="GET", kind="blob"))

    async def get(r: MirrorProcess) -> str:
        async with http.get(f"{r.url}/v2/{repo}/blobs/{digest}") as resp:
            assert resp.status == 200
            return "sha256:" + hashlib.sha256(await resp.read()).hexdigest()

    clients = [asyncio.ensure_future(get(r)) for r in others for _ in range(3)]

    def spooled(r: MirrorProcess) -> int:
        return max((p.stat().st_size for p in (r.workdir / spool / "tmp").iterdir()
                    if not p.name.endswith(".lock")), default=0)

    await wait_until(lambda: all(spooled(r) > 1 << 20 for r in others), timeout=20,
                     what="both replicas receiving the owner's stream")
    owner.kill_all()
    bodies = list(await asyncio.gather(*clients))
    gets = [s for s in upstream.matching("GET", "blob") if s.path.endswith(digest)]
    return others, bodies, len(gets)


ACCEPT = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def pull(http: aiohttp.ClientSession, r: MirrorProcess, repo: str, tag: str,
               image: Image) -> list[str]:
    """Pull the image like a client: the manifest by tag, then every blob. Returns the
    digests of what arrived (asserted equal to what was asked by the caller)."""
    async with http.get(f"{r.url}/v2/{repo}/manifests/{tag}",
                        headers={"Accept": ACCEPT}) as resp:
        assert resp.status == 200, await resp.text()
        got = [sha(await resp.read())]
    for blob in image.blobs:
        async with http.get(f"{r.url}/v2/{repo}/blobs/{blob.digest}") as resp:
            assert resp.status == 200, await resp.text()
            got.append(sha(await resp.read()))
    return got


def per_blob_gets(proxy: CountingProxy, image: Image) -> dict[str, int]:
    """Upstream GETs per blob of ``image`` that reached ``proxy``."""
    return {b.digest: len([s for s in proxy.matching("GET", "blob")
                           if s.path.endswith(b.digest)]) for b in image.blobs}


async def pull_everywhere(cluster: MirrorCluster, http: aiohttp.ClientSession, repo: str,
                          image: Image, dest: Path) -> None:
    """27 concurrent client pulls of ``repo:v1`` spread over the three replicas, and a skopeo
    copy through each replica (into ``dest``), all at once; asserts every manifest and blob
    that arrived has the right digest."""
    want = [image.digest, *(b.digest for b in image.blobs)]
    clients = [asyncio.ensure_future(pull(http, cluster.replicas[i % 3], repo, "v1", image))
               for i in range(27)]
    copies = [asyncio.ensure_future(skopeo_copy(f"docker://{r.host}/{repo}:v1",
                                                dest / f"skopeo{i}"))
              for i, r in enumerate(cluster.replicas)]
    for got in await asyncio.gather(*clients):
        assert got == want
    for copy in await asyncio.gather(*copies):
        for b in image.blobs:
            assert sha((copy.dest_dir / b.digest.split(":")[1]).read_bytes()) == b.digest
