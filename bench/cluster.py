#!/usr/bin/env python3
"""Cluster benchmark (issue 12): three mirrorcache replicas acting as one cache, behind nginx
round-robin, against one replica and against three independent Distribution proxies.

Usage::

    PYTHONPATH=. python bench/cluster.py [--blob-mib 200] [--clients 50] [--warm-clients 200]
                                         [--small-mib 1] [--small-layers 16] [--results PATH]

Everything is on 127.0.0.1 under a temporary directory: a Distribution upstream behind the
tests' counting proxy (every upstream request counted), nginx (``worker_processes 1``,
``proxy_buffering off``, upstream keepalive) round-robin over the members, mirrorcache as
``python -m mirrorcache serve`` processes (each replica on its own cache directory).

Measures: 1. ``--clients`` simultaneous cold GETs of one ``--blob-mib`` blob through nginx:
upstream GETs for it (goal: 1 for the cluster, against 3 or more for three independent
Distribution proxies) and wall time against the same clients on one replica; 2.
``--warm-clients`` simultaneous warm pulls (each client: ``--small-layers`` blobs of
``--small-mib``) through nginx over the three replicas, against one replica behind the same
nginx: aggregate MiB/s. Two of the cold streams are sha256-checked, every warm one is.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.countingproxy import CountingProxy
from tests.support.images import Image, make_image, push_image
from tests.support.mirror import mirror_config
from tests.support.mirrorcluster import MirrorCluster
from tests.support.mirrorproc import MirrorProcess
from tests.support.ports import free_port
from tests.support.registry import RegistryProcess

CHUNK = 1 << 20


class Nginx:
    def __init__(self, workdir: Path, servers: list[str]) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        upstream = "\n".join(f"    server {s};" for s in servers)
        d = self.dir
        (d / "nginx.conf").write_text(f"""
worker_processes 1;
daemon off;
user root;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  upstream members {{
{upstream}
    keepalive 256;
  }}
  server {{
    listen 127.0.0.1:{self.port} backlog=1024;
    location / {{
      proxy_pass http://members;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $http_host;
      proxy_buffering off;
      proxy_request_buffering off;
      proxy_read_timeout 300s;
    }}
  }}
}}
""")
        self.proc: subprocess.Popen[bytes] | None = None

    async def __aenter__(self) -> Nginx:
        self.proc = subprocess.Popen(["nginx", "-c", str(self.dir / "nginx.conf"),
                                      "-p", str(self.dir)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        async with aiohttp.ClientSession() as http:
            while True:
                try:
                    async with http.get(f"{self.url}/healthz") as resp:
                        if resp.status in (200, 404):
                            return self
                except aiohttp.ClientError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("nginx did not start")
                await asyncio.sleep(0.05)

    async def __aexit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)


async def get_blob(http: aiohttp.ClientSession, url: str, verify: str | None) -> int:
    h = hashlib.sha256() if verify else None
    n = 0
    async with http.get(url) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{url}: {resp.status} {await resp.text()}")
        async for chunk in resp.content.iter_chunked(CHUNK):
            n += len(chunk)
            if h is not None:
                h.update(chunk)
    if h is not None and "sha256:" + h.hexdigest() != verify:
        raise RuntimeError(f"{url}: wrong digest")
    return n


async def cold(base: str, repo: str, digest: str, clients: int) -> tuple[float, int]:
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn,
                                     timeout=aiohttp.ClientTimeout(total=600)) as http:
        url = f"{base}/v2/{repo}/blobs/{digest}"
        start = time.monotonic()
        sizes = await asyncio.gather(*(get_blob(http, url, digest if i < 2 else None)
                                       for i in range(clients)))
        return time.monotonic() - start, sum(sizes)


async def warm(base: str, repo: str, image: Image, clients: int) -> tuple[float, int]:
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn,
                                     timeout=aiohttp.ClientTimeout(total=600)) as http:
        async def client() -> int:
            return sum([await get_blob(http, f"{base}/v2/{repo}/blobs/{b.digest}", b.digest)
                        for b in image.layers])

        start = time.monotonic()
        total = sum(await asyncio.gather(*(client() for _ in range(clients))))
        return time.monotonic() - start, total


def blob_gets(proxy: CountingProxy, digest: str) -> int:
    return len([s for s in proxy.matching("GET", "blob") if s.path.endswith(digest)])


async def main(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="mirrorcache-bench-cluster-"))
    out: dict[str, Any] = {}
    try:
        with RegistryProcess(workdir=work / "upstream") as upstream:
            big = make_image([args.blob_mib << 20], raw=True)
            small = make_image([args.small_mib << 20] * args.small_layers, raw=True)
            await push_image(upstream.url, "bench/big", big, "v1")
            await push_image(upstream.url, "bench/small", small, "v1")
            digest = big.layers[0].digest
            async with CountingProxy(upstream.url, chunk_size=1 << 20) as proxy:
                # 1a. three replicas acting as one cache, nginx round-robin in front.
                async with MirrorCluster(work / "cluster", proxy.url) as cluster, \
                        Nginx(work / "nginx-cluster", cluster.hosts) as lb:
                    proxy.reset()
                    wall, nbytes = await cold(lb.url, "bench/big", digest, args.clients)
                    out["cluster_cold"] = {"wall_s": round(wall, 2),
                                           "upstream_gets": blob_gets(proxy, digest),
                                           "bytes": nbytes}
                    fallbacks = [await cluster.metric(r, "mirrorcache_peer_fallbacks_total")
                                 for r in cluster.replicas]
                    out["cluster_cold"]["fallbacks"] = sum(fallbacks)
                    await warm(lb.url, "bench/small", small, 3)  # every replica warm
                    proxy.reset()
                    wall, nbytes = await warm(lb.url, "bench/small", small, args.warm_clients)
                    out["cluster_warm"] = {"wall_s": round(wall, 2),
                                           "mib_s": round(nbytes / wall / (1 << 20)),
                                           "upstream_gets": proxy.count("GET", "blob")}
                # 1b. one replica, the same nginx setup.
                raw = mirror_config(work / "single", {"docker.io": {"url": proxy.url}})
                async with MirrorProcess(raw, work / "single") as one, \
                        Nginx(work / "nginx-single", [one.host]) as lb:
                    proxy.reset()
                    wall, nbytes = await cold(lb.url, "bench/big", digest, args.clients)
                    out["single_cold"] = {"wall_s": round(wall, 2),
                                          "upstream_gets": blob_gets(proxy, digest)}
                    await warm(lb.url, "bench/small", small, 1)
                    wall, nbytes = await warm(lb.url, "bench/small", small, args.warm_clients)
                    out["single_warm"] = {"wall_s": round(wall, 2),
                                          "mib_s": round(nbytes / wall / (1 << 20))}
                # 1c. three independent Distribution proxies.
                peers = [RegistryProcess(proxy_remote_url=proxy.url,
                                         workdir=work / f"distribution{i}") for i in range(3)]
                # Started off the loop: a proxy-mode registry contacts the counting proxy
                # (which runs on this loop) while it starts.
                await asyncio.gather(*(asyncio.to_thread(p.start) for p in peers))
                try:
                    async with Nginx(work / "nginx-distribution", [p.host for p in peers]) as lb:
                        proxy.reset()
                        wall, nbytes = await cold(lb.url, "bench/big", digest, args.clients)
                        out["distribution3_cold"] = {"wall_s": round(wall, 2),
                                                     "upstream_gets": blob_gets(proxy, digest)}
                finally:
                    for p in peers:
                        p.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def report(res: dict[str, Any], args: argparse.Namespace) -> str:
    c, s, d = res["cluster_cold"], res["single_cold"], res["distribution3_cold"]
    cw, sw = res["cluster_warm"], res["single_warm"]
    rows = [
        ("upstream GETs, {n} cold clients of {m} MiB via nginx", c["upstream_gets"],
         f"3 Distribution proxies: {d['upstream_gets']}", "", "1"),
        ("cold wall, 3 replicas vs 1 replica", f"{c['wall_s']} s", f"{s['wall_s']} s",
         f"{c['wall_s'] / s['wall_s']:.2f}x", "info"),
        ("peer fallbacks during the cold run", c["fallbacks"], "", "", "0"),
        ("{w} warm clients, 3 replicas vs 1 replica", f"{cw['mib_s']} MiB/s",
         f"{sw['mib_s']} MiB/s", f"{cw['mib_s'] / sw['mib_s']:.2f}x", "info"),
        ("upstream GETs during the warm run", cw["upstream_gets"], "", "", "0"),
    ]
    lines = ["| measure | cluster | reference | ratio | goal |", "|---|---|---|---|---|"]
    for name, a, b, r, g in rows:
        name = name.format(n=args.clients, m=args.blob_mib, w=args.warm_clients)
        lines.append(f"| {name} | {a} | {b} | {r} | {g} |")
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blob-mib", type=int, default=200)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--warm-clients", type=int, default=200)
    ap.add_argument("--small-mib", type=int, default=1)
    ap.add_argument("--small-layers", type=int, default=16)
    ap.add_argument("--results", type=Path)
    a = ap.parse_args()
    result = asyncio.run(main(a))
    text = report(result, a)
    print(result)
    print(text)
    if a.results:
        a.results.write_text(text + "\n")
