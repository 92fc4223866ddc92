#!/usr/bin/env python3
"""The S3 backend against the filesystem backend, and against Distribution's own S3 driver.

Usage::

    python bench/s3.py [--big-mib 200] [--reps 3] [--results bench/RESULTS-s3.md]

Everything runs on 127.0.0.1 as processes of this script, in a temporary work directory:

* the **upstream**: Distribution 2.8 (``docker-registry``, filesystem storage) holding
  ``bench/big``, one layer of ``--big-mib`` random bytes;
* **moto**'s standalone server as the S3 endpoint (tests/support/s3server.py), one bucket per
  contender;
* **mirrorcache, filesystem**: ``storage.filesystem``;
* **mirrorcache, S3 + local tier**: ``storage.s3`` with ``local_cache`` (1 GiB): after the cold
  pull the blob is in the tier and warm pulls go out with sendfile (*tier hit*);
* **mirrorcache, S3, tier miss**: a second process on the same bucket whose tier is too small
  for the blob (``max_size: 1MiB``), so every pull streams from S3 with ranged GETs;
* the **peer**: Distribution 2.8 in proxy mode with its own ``s3`` storage driver
  (``regionendpoint`` = moto, ``redirect: disable``, so it streams like mirrorcache does),
  started WITHOUT ``AWS_CA_BUNDLE`` in its environment (it panics with
  ``LoadCustomCABundleError`` otherwise).

Each figure is one GET of the big blob by ``bench/fetch.py`` (one connection, body discarded;
the cold pulls and one warm pull per contender are sha256-checked); warm figures are medians
of ``--reps``, measured once the cold pull's blob is published (mirrorcache serves verified
bytes before its S3 upload completes). Goals: tier hits >= 0.9x the filesystem backend
warm; tier misses >= 1.0x the peer warm (both read the blob from the same moto).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.images import make_image, push_image  # noqa: E402
from tests.support.mirrorproc import MirrorProcess  # noqa: E402
from tests.support.registry import RegistryProcess  # noqa: E402
from tests.support.s3server import (  # noqa: E402
    ACCESS_KEY,
    REGION,
    SECRET_KEY,
    MotoServer,
    aws_env,
    make_bucket,
)

MiB = 1 << 20
FETCH = str(ROOT / "bench" / "fetch.py")
REPO = "bench/big"


class S3Peer(RegistryProcess):
    """Distribution in proxy mode on the ``s3`` storage driver (no filesystem storage)."""

    def __init__(self, s3: dict[str, Any], **kw: Any) -> None:
        super().__init__(**kw)
        self.s3 = s3

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        cfg["storage"] = {"s3": self.s3, "redirect": {"disable": True},
                          "delete": {"enabled": True},
                          "maintenance": {"uploadpurging": {"enabled": False}}}
        return cfg


def fetch(url: str, *, check: bool) -> dict[str, Any]:
    out = subprocess.run([sys.executable, FETCH, "--hash", "all" if check else "none", url],
                         capture_output=True, text=True, timeout=600, check=True)
    doc = json.loads(out.stdout)
    t = doc["transfers"][0]
    if t["error"] or t["status"] != 200:
        raise RuntimeError(f"{url}: {t['status']} {t['error']}")
    return t


def mibps(t: dict[str, Any]) -> float:
    return t["bytes"] / MiB / max(t["end"] - t["start"], 1e-9)


def pull(base: str, digest: str, *, check: bool = False) -> float:
    t = fetch(f"{base}/v2/{REPO}/blobs/{digest}", check=check)
    if check and "sha256:" + str(t["sha256"]) != digest:
        raise RuntimeError(f"{base}: wrong bytes for {digest}")
    return mibps(t)


def warm(base: str, digest: str, reps: int) -> float:
    pull(base, digest, check=True)  # untimed, verified
    return statistics.median(pull(base, digest) for _ in range(reps))


async def published(m: MirrorProcess, digest: str, timeout: float = 300.0) -> None:
    """Wait until ``m`` logged the blob committed (S3: the upload completed and the local
    tier adopted the spool), so warm figures measure the cache, not a publish in progress."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not any(e.get("digest") == digest and "upstream" in e
                  for e in m.events("blob.committed")):
        if loop.time() > deadline:
            raise TimeoutError(f"{digest} not committed within {timeout}s")
        await asyncio.sleep(0.1)


def mirror_raw(upstream: str, storage: dict[str, Any]) -> dict[str, Any]:
    return {"storage": storage, "upstreams": {"docker.io": {"url": upstream}},
            "default_upstream": "docker.io"}


def s3_section(moto: MotoServer, bucket: str, tier: Path, max_size: str) -> dict[str, Any]:
    return {"bucket": bucket, "endpoint_url": moto.url, "region": REGION,
            "addressing_style": "path", "local_cache": {"path": str(tier), "max_size": max_size}}


async def run(args: argparse.Namespace, work: Path) -> dict[str, float]:
    figures: dict[str, float] = {}
    upstream = RegistryProcess(workdir=work / "upstream").start()
    moto = MotoServer().start()
    try:
        img = make_image([args.big_mib * MiB], media="oci", raw=True, seed=11)
        await push_image(upstream.url, REPO, img, "v1")
        digest = img.layers[0].digest
        env = aws_env()

        fs = MirrorProcess(mirror_raw(upstream.url, {"filesystem": {"path": str(work / "fs")}}),
                           work / "fs-proc", env=env)
        async with fs:
            figures["fs_cold"] = pull(fs.url, digest, check=True)
            await published(fs, digest)
            figures["fs_warm"] = warm(fs.url, digest, args.reps)

        bucket = await make_bucket(moto)
        hit = MirrorProcess(mirror_raw(upstream.url, {
            "s3": s3_section(moto, bucket, work / "tier-a", "1GiB"),
            "metadata_path": str(work / "meta-a")}), work / "s3-a", env=env)
        async with hit:
            figures["s3_cold"] = pull(hit.url, digest, check=True)
            await published(hit, digest)
            figures["s3_tier_hit"] = warm(hit.url, digest, args.reps)
        miss = MirrorProcess(mirror_raw(upstream.url, {
            "s3": s3_section(moto, bucket, work / "tier-b", "1MiB"),
            "metadata_path": str(work / "meta-b")}), work / "s3-b", env=env)
        async with miss:
            figures["s3_tier_miss"] = warm(miss.url, digest, args.reps)

        peer_bucket = await make_bucket(moto)
        os.environ.pop("AWS_CA_BUNDLE", None)  # Distribution panics with it set
        peer = S3Peer({"region": REGION, "regionendpoint": moto.url, "bucket": peer_bucket,
                       "accesskey": ACCESS_KEY, "secretkey": SECRET_KEY, "secure": False,
                       "v4auth": True}, proxy_remote_url=upstream.url, workdir=work / "peer")
        peer.start()
        try:
            figures["peer_cold"] = pull(peer.url, digest, check=True)
            figures["peer_warm"] = warm(peer.url, digest, args.reps)
        finally:
            peer.stop()
    finally:
        moto.close()
        upstream.stop()
    return figures


def results(args: argparse.Namespace, f: dict[str, float], load: str) -> str:
    def row(name: str, mine: float, ref: float, goal: float | None) -> str:
        ratio = mine / ref
        verdict = "" if goal is None else ("met" if ratio >= goal else "MISSED")
        g = "" if goal is None else f">= {goal:.1f}x"
        return f"| {name} | {mine:,.0f} | {ref:,.0f} | {ratio:.2f}x | {g} | {verdict} |"

    return "\n".join([
        "# S3 backend benchmark (bench/s3.py)",
        "",
        f"Run {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, `python bench/s3.py --big-mib "
        f"{args.big_mib} --reps {args.reps}`; one {args.big_mib} MiB blob, one stream, "
        "MiB/s (warm: median of the reps). Load average at start and end: "
        f"{load}. **Run once on a shared 2-core machine** (other sessions were running): "
        "treat ratios near a goal as noise.",
        "",
        "| measure | mirrorcache MiB/s | reference MiB/s | ratio | goal | |",
        "|---|---|---|---|---|---|",
        row("S3, local tier hit vs filesystem backend warm", f["s3_tier_hit"], f["fs_warm"],
            0.9),
        row("S3, local tier miss (ranged GETs from moto) vs Distribution s3 driver warm",
            f["s3_tier_miss"], f["peer_warm"], 1.0),
        row("S3 cold (upstream -> spool + multipart upload) vs filesystem cold",
            f["s3_cold"], f["fs_cold"], None),
        row("S3 cold vs Distribution s3 driver cold", f["s3_cold"], f["peer_cold"], None),
        "",
        "Raw figures (MiB/s): " + ", ".join(f"{k} {v:,.0f}" for k, v in f.items()) + ".",
        "",
        "Both S3 contenders read from the same moto server (a Python process), which bounds",
        "the tier-miss and peer-warm figures; the tier hit and the filesystem backend both go",
        "out with sendfile from the page cache.",
        "",
    ])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--big-mib", type=int, default=200)  # make_image: at most 255
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "RESULTS-s3.md")
    args = p.parse_args()
    load0 = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    with tempfile.TemporaryDirectory(prefix="mirrorcache-bench-s3-") as tmp:
        figures = asyncio.run(run(args, Path(tmp)))
    load1 = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    text = results(args, figures, f"{load0} / {load1}")
    args.results.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
