"""Benchmark the cache lifecycle.

1. The sweeper over generated metadata (not pulled): 100 000 blobs, 10 000 images (each a
   manifest, a config and 8 layers drawn from a shared pool), access times spread over
   90 days, a size limit that makes it evict about a fifth. The blob store is in memory
   (the sweeper uses only ``list``, ``delete`` and ``local_path`` of it), the lifecycle
   database is the real sqlite file. Reports plan and execute time and peak memory
   (tracemalloc, in a second run).
2. The hot-path cost of access tracking: warm manifest GETs by digest against an in-process
   mirror (subprocess), tracking on vs off, alternated in the same run (bench/loadgen.py).

    PYTHONPATH=. python3 bench/sweeper.py [--blobs 100000] [--images 10000] [-d 5]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import multiprocessing
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path

from mirrorcache.config import LifecycleConfig, RetentionConfig, SizeLimits
from mirrorcache.lifecycle.db import LifecycleDB
from mirrorcache.lifecycle.sweeper import Sweeper
from mirrorcache.oci.reference import Digest
from mirrorcache.storage.base import BlobInfo


def _digest(i: int, kind: str) -> str:
    return "sha256:" + hashlib.sha256(f"{kind}{i}".encode()).hexdigest()


class MemStore:
    def __init__(self, blobs: dict[str, int]) -> None:
        self.blobs = blobs

    async def list(self) -> AsyncIterator[BlobInfo]:
        for d, size in list(self.blobs.items()):
            yield BlobInfo(Digest(*d.split(":", 1)), size)

    async def delete(self, digest: Digest) -> None:
        self.blobs.pop(str(digest), None)

    def local_path(self, digest: Digest) -> Path | None:
        return None


def generate(directory: Path, n_blobs: int, n_images: int) -> tuple[dict[str, int], int]:
    rng = random.Random(7)
    now = time.time()
    layers = [_digest(i, "layer") for i in range(n_blobs - 2 * n_images)]
    blobs = {d: rng.randint(1 << 10, 64 << 20) for d in layers}
    db = LifecycleDB(directory)
    access, tags, parsed = [], [], []
    for i in range(n_images):
        m, c = _digest(i, "manifest"), _digest(i, "config")
        blobs[m], blobs[c] = 2000, 5000
        chosen = rng.sample(layers, 8)
        last = now - rng.uniform(0, 90 * 86400)
        access.append((m, rng.randint(1, 500), last, 1))
        for d in [c, *chosen]:
            access.append((d, 1, last, 0))
        tags.append(("docker.io", f"org/app{i % 2000}", f"v{i}", m, 1, last))
        parsed.append((m, True, [c, *chosen]))
    db.add_access(access, tags, [])
    db.set_parsed(parsed + [(d, False, []) for d in layers] +
                  [(_digest(i, "config"), False, []) for i in range(n_images)])
    db.close()
    return blobs, sum(blobs.values())


async def sweep_once(directory: Path, blobs: dict[str, int], total: int
                     ) -> dict[str, float]:
    db = LifecycleDB(directory)
    sweeper = Sweeper(MemStore(blobs), db, None,  # type: ignore[arg-type]
                      limits=SizeLimits(max_size=int(total / 0.95), high_watermark=0.9,
                                        low_watermark=0.76),
                      retention=RetentionConfig(), lifecycle=LifecycleConfig(), pins=(),
                      lock_dir=directory)
    t0 = time.perf_counter()
    plan = await sweeper.plan()
    t1 = time.perf_counter()
    result = await sweeper.execute(plan)
    t2 = time.perf_counter()
    db.close()
    return {"plan_s": t1 - t0, "execute_s": t2 - t1, "images_evicted": result.images,
            "bytes_freed": result.freed, "blobs_deleted": sum(len(e.delete)
                                                              for e in plan.evictions)}


def bench_sweeper(n_blobs: int, n_images: int) -> dict[str, object]:
    out: dict[str, object] = {"blobs": n_blobs, "images": n_images}
    with tempfile.TemporaryDirectory() as tmp:
        blobs, total = generate(Path(tmp) / "a", n_blobs, n_images)
        out.update(asyncio.run(sweep_once(Path(tmp) / "a", dict(blobs), total)))
        blobs, total = generate(Path(tmp) / "b", n_blobs, n_images)
        tracemalloc.start()
        asyncio.run(sweep_once(Path(tmp) / "b", dict(blobs), total))
        out["peak_mib_tracemalloc"] = round(tracemalloc.get_traced_memory()[1] / 2**20, 1)
        tracemalloc.stop()
    return out


# -- hot path ------------------------------------------------------------------------------

MANIFEST = json.dumps({"schemaVersion": 2,
                       "mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                  "digest": _digest(0, "config"), "size": 10},
                       "layers": []}).encode()
MDIGEST = "sha256:" + hashlib.sha256(MANIFEST).hexdigest()


def serve(root: str, port: int, tracking: bool, ready: multiprocessing.synchronize.Event
          ) -> None:
    from aiohttp import web

    from mirrorcache.api.services import SERVICES
    from mirrorcache.app import create_app
    from mirrorcache.config import parse_config
    from mirrorcache.log import configure_logging
    from mirrorcache.storage.metadata import Metadata

    configure_logging("error", "json")
    cfg = parse_config({"storage": {"filesystem": {"path": root}},
                        "upstreams": {"docker.io": {"url": "http://127.0.0.1:9",
                                                    "offline": True}},
                        "default_upstream": "docker.io", "log": {"level": "error"}}, {})

    async def main() -> None:
        meta = Metadata(cfg.storage.metadata_path)
        await meta.link("docker.io", "library/bench", Digest(*MDIGEST.split(":", 1)))
        meta.close()
        app = create_app(cfg)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        app[SERVICES].access.enabled = tracking
        await web.TCPSite(runner, "127.0.0.1", port).start()
        ready.set()
        await asyncio.Event().wait()

    asyncio.run(main())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bench_hot_path(seconds: float, rounds: int) -> dict[str, object]:
    results: dict[str, list[float]] = {"on": [], "off": []}
    with tempfile.TemporaryDirectory() as tmp:
        blob = Path(tmp) / "blobs" / "sha256" / MDIGEST[7:9] / MDIGEST[7:]
        blob.parent.mkdir(parents=True)
        blob.write_bytes(MANIFEST)
        for _ in range(rounds):
            for mode in ("on", "off"):
                port = free_port()
                ready = multiprocessing.Event()
                proc = multiprocessing.Process(target=serve, args=(tmp, port, mode == "on",
                                                                   ready))
                proc.start()
                ready.wait(20)
                url = f"http://127.0.0.1:{port}/v2/library/bench/manifests/{MDIGEST}"
                run = subprocess.run(
                    [sys.executable, str(Path(__file__).parent / "loadgen.py"), url,
                     "-c", "16", "-d", str(seconds), "--header",
                     "Accept: application/vnd.oci.image.manifest.v1+json"],
                    capture_output=True, text=True, check=True)
                doc = json.loads(run.stdout)
                assert set(doc["statuses"]) == {"200"}, doc["statuses"]
                results[mode].append(float(doc["rps"]))
                proc.terminate()
                proc.join()
    on, off = statistics.median(results["on"]), statistics.median(results["off"])
    return {"rps_on": results["on"], "rps_off": results["off"], "median_on": on,
            "median_off": off, "slowdown_pct": round((off - on) / off * 100, 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--blobs", type=int, default=100_000)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("-d", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from mirrorcache.log import configure_logging

    configure_logging("error", "json")
    print(json.dumps({"cpus": os.cpu_count(), "sweeper": bench_sweeper(args.blobs, args.images),
                      "hot_path": bench_hot_path(args.d, args.rounds)}, indent=2))


if __name__ == "__main__":
    main()
