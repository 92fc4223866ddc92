"""Cache size limit, LRU image eviction, retention, pins, gc and inventory, end to end:
skopeo pulls generated images from a real docker-registry through the mirror."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from structlog.testing import capture_logs

from mirrorcache.app import SWEEPER
from mirrorcache.lifecycle.db import LifecycleDB
from mirrorcache.storage.fs import FilesystemBlobStore
from mirrorcache.verify import verify_store
from tests.support.countingproxy import CountingProxy, Fault
from tests.support.images import (
    MANIFEST_ACCEPT,
    Blob,
    Image,
    _canonical,
    make_image,
    push_image,
)
from tests.support.mirror import Mirror, mirror_config
from tests.support.mirrorproc import MirrorProcess
from tests.support.registry import RegistryProcess
from tests.support.skopeo import copied_blob_digests, manifest_digest, skopeo_copy
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

DAY = 86400.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def with_layer(img: Image, extra: Blob) -> Image:
    """``img`` with one more (shared) layer appended."""
    layers = (*img.layers, extra)
    doc: dict[str, Any] = {"schemaVersion": 2, "mediaType": img.media_type,
                           "config": img.config.descriptor(),
                           "layers": [b.descriptor() for b in layers]}
    return Image(_canonical(doc), img.media_type, img.config, layers, img.platform)


def stored(root: Path) -> dict[str, int]:
    out = {}
    for p in (root / "cache" / "blobs").rglob("*"):
        if p.is_file():
            out[f"{p.parent.parent.name}:{p.name}"] = p.stat().st_size
    return out


async def pull(mirror_host: str, repo: str, tag: str, dest: Path, img: Image) -> None:
    out = await skopeo_copy(f"docker://{mirror_host}/{repo}:{tag}", dest)
    assert manifest_digest(out.dest_dir) == img.digest
    assert copied_blob_digests(out.dest_dir) == img.blob_digests


def raw_config(tmp_path: Path, hub: CountingProxy, **extra: Any) -> dict[str, Any]:
    raw = mirror_config(tmp_path, {"docker.io": {"url": hub.url}}, **extra)
    raw.setdefault("lifecycle", {"sweep_interval": "1h", "flush_interval": "100ms",
                                 "protect_recent": "1s"})
    return raw


async def test_fill_past_limit_evicts_lru_images_keeps_pinned_and_shared(
        tmp_path: Path, registry: RegistryProcess, unique_repo: str) -> None:
    shared = make_image([60_000]).layers[0]
    images = [make_image([50_000, 40_000]) for _ in range(6)]
    images[0] = with_layer(images[0], shared)  # evicted later, shares `shared` with [5]
    images[5] = with_layer(images[5], shared)
    pinned = make_image([50_000, 40_000])
    for i, img in enumerate(images):
        await push_image(registry.url, unique_repo, img, f"v{i}")
    await push_image(registry.url, unique_repo, pinned, "keep-1")
    total_one = sum(b.size for b in images[1].blobs) + images[1].size
    limit = int(total_one * 4.2)
    clock = Clock()
    async with CountingProxy(registry.url) as hub:
        raw = raw_config(tmp_path, hub, pins=[f"docker.io/{unique_repo}:keep-*"])
        raw["storage"]["max_size"] = limit
        async with Mirror(raw, wall_clock=clock) as mirror:
            await pull(mirror.host, unique_repo, "keep-1", tmp_path / "p", pinned)
            for i, img in enumerate(images):
                clock.now += 60
                await pull(mirror.host, unique_repo, f"v{i}", tmp_path / f"a{i}", img)
            clock.now += 60
            with capture_logs() as logs:
                await mirror.app[SWEEPER].sweep(trigger="test")
            on_disk = stored(tmp_path)
            assert sum(on_disk.values()) <= limit
            evicted = {e["digest"] for e in logs if e["event"] == "cache.evicted"}
            assert images[0].digest in evicted or images[0].digest not in on_disk
            # The pinned (oldest) image and the two most recent images are intact.
            for img in (pinned, images[4], images[5]):
                assert img.digest in on_disk
                assert img.blob_digests <= set(on_disk)
            # The blob shared with the kept image stays; the evicted image's own ones go.
            assert shared.digest in on_disk
            assert images[0].digest not in on_disk
            assert not (images[0].blob_digests - {shared.digest}) & set(on_disk)
            hub.reset()
            for i in (4, 5):
                await pull(mirror.host, unique_repo, f"v{i}", tmp_path / f"again{i}", images[i])
            await pull(mirror.host, unique_repo, "keep-1", tmp_path / "p2", pinned)
            assert hub.count() == 0
            # An evicted image is simply fetched again, all of it but the kept shared blob
            # (room is made by evicting again: what was pulled a minute ago is not protected).
            clock.now += 60
            await pull(mirror.host, unique_repo, "v0", tmp_path / "back0", images[0])
            assert hub.count("GET", "blob") == len(images[0].blob_digests) - 1
        report = await verify_store(FilesystemBlobStore(tmp_path / "cache"), repair=False)
        assert report.bad == [] and report.checked == len(stored(tmp_path))


async def test_retention_unused_for_with_injected_clock(
        tmp_path: Path, registry: RegistryProcess, unique_repo: str) -> None:
    old, new = make_image([30_000]), make_image([30_000])
    await push_image(registry.url, unique_repo, old, "old")
    await push_image(registry.url, unique_repo, new, "new")
    clock = Clock()
    async with CountingProxy(registry.url) as hub:
        raw = raw_config(tmp_path, hub, retention={"unused_for": "30d"})
        async with Mirror(raw, wall_clock=clock) as mirror:
            await pull(mirror.host, unique_repo, "old", tmp_path / "o", old)
            clock.now += 20 * DAY
            await pull(mirror.host, unique_repo, "new", tmp_path / "n", new)
            clock.now += 15 * DAY  # old: unused 35 days, new: 15 days
            with capture_logs() as logs:
                result = await mirror.app[SWEEPER].sweep(trigger="test")
            assert result is not None
            events = [e for e in logs if e["event"] == "cache.evicted"]
            assert [(e["digest"], e["reason"]) for e in events] == [(old.digest, "retention")]
            on_disk = set(stored(tmp_path))
            assert old.digest not in on_disk and not old.blob_digests & on_disk
            assert new.digest in on_disk and new.blob_digests <= on_disk
            # The tag record went with the manifest: the next pull asks upstream again.
            hub.reset()
            await pull(mirror.host, unique_repo, "old", tmp_path / "o2", old)
            assert hub.count("GET", "blob") == len(old.blob_digests)


async def test_pull_running_while_sweeper_evicts_it(
        tmp_path: Path, registry: RegistryProcess, unique_repo: str) -> None:
    img = make_image([40_000, 3_000_000, 50_000])
    await push_image(registry.url, unique_repo, img, "v1")
    clock = Clock()
    async with CountingProxy(registry.url, chunk_size=16 * 1024) as hub:
        raw = raw_config(tmp_path, hub, retention={"unused_for": "10s"})
        big = img.layers[1].digest
        hub.add_fault(Fault.slow(0.02, method="GET", path=big))
        async with Mirror(raw, wall_clock=clock) as mirror:
            task = asyncio.create_task(pull(mirror.host, unique_repo, "v1", tmp_path / "a",
                                            img))
            await wait_until(lambda: any(s.path.endswith(big) for s in hub.requests), timeout=30)
            await asyncio.sleep(0)
            clock.now += 3600  # everything pulled so far is past retention
            with capture_logs() as logs:
                await mirror.app[SWEEPER].sweep(trigger="test")
            assert any(e["event"] == "cache.evicted" and e["digest"] == img.digest
                       for e in logs)
            await task  # completes with the right manifest and blob digests
        report = await verify_store(FilesystemBlobStore(tmp_path / "cache"), repair=False)
        assert report.bad == []


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.run([sys.executable, "-m", "mirrorcache", *args], capture_output=True,
                          text=True, env=env, timeout=60, check=False)


async def test_gc_dry_run_changes_nothing_and_gc_carries_out_the_same_plan(
        tmp_path: Path, registry: RegistryProcess, unique_repo: str) -> None:
    images = [make_image([40_000, 20_000]) for _ in range(4)]
    for i, img in enumerate(images):
        await push_image(registry.url, unique_repo, img, f"v{i}")
    async with CountingProxy(registry.url) as hub:
        raw = raw_config(tmp_path, hub)
        raw["lifecycle"]["protect_recent"] = "100ms"
        total = sum(b.size for img in images for b in img.blobs) + sum(i.size for i in images)
        raw["storage"].update(max_size=int(total * 1.05), high_watermark="100%",
                              low_watermark="60%")
        async with Mirror(raw) as mirror:
            for i, img in enumerate(images):
                await pull(mirror.host, unique_repo, f"v{i}", tmp_path / f"a{i}", img)
        cfg = tmp_path / "mc.yaml"
        cfg.write_text(yaml.safe_dump(raw))
        await asyncio.sleep(0.2)  # past protect_recent
        before = stored(tmp_path)
        dry = run_cli("gc", "--dry-run", "--config", str(cfg))
        assert dry.returncode == 0, dry.stderr
        assert stored(tmp_path) == before
        inv = run_cli("inventory", "--json", "--sort", "name", "--config", str(cfg))
        rows = json.loads(inv.stdout)
        assert [(r["tag"], r["digest"], r["pulls"]) for r in rows] == [
            (f"v{i}", img.digest, 1) for i, img in enumerate(images)]
        real = run_cli("gc", "--config", str(cfg))
        assert real.returncode == 0, real.stderr
        plan = dry.stdout.splitlines()[:-1]
        assert plan == real.stdout.splitlines()[:-1]
        assert plan[0].startswith(f"evict {images[0].digest} (docker.io/{unique_repo}:v0)")
        after = stored(tmp_path)
        assert sum(after.values()) <= total * 1.05 * 0.6
        assert images[-1].digest in after and images[0].digest not in after
        inv = run_cli("inventory", "--json", "--config", str(cfg))
        assert images[0].digest not in {r["digest"] for r in json.loads(inv.stdout)}


async def test_two_workers_counts_add_up_and_one_sweeper(
        tmp_path: Path, registry: RegistryProcess, unique_repo: str) -> None:
    img = make_image([10_000])
    await push_image(registry.url, unique_repo, img, "v1")
    raw = mirror_config(tmp_path, {"docker.io": {"url": registry.url}})
    raw["lifecycle"] = {"sweep_interval": "300ms", "flush_interval": "100ms",
                        "protect_recent": "1s"}
    requests = 60
    async with MirrorProcess(raw, tmp_path / "proc", workers=2) as proc:
        url = f"{proc.url}/v2/{unique_repo}/manifests/v1"
        for _ in range(requests):  # a fresh connection each: SO_REUSEPORT spreads them
            async with aiohttp.ClientSession() as http, \
                    http.get(url, headers={"Accept": MANIFEST_ACCEPT}) as resp:
                assert resp.status == 200
                assert resp.headers["Docker-Content-Digest"] == img.digest

        def flushed() -> int:
            return sum(e["pulls"] for e in proc.events("lifecycle.flushed"))

        await wait_until(lambda: flushed() >= requests, timeout=20)
        await wait_until(lambda: len(proc.events("cache.sweep")) >= 3, timeout=20)
        flushers = {e["pid"] for e in proc.events("lifecycle.flushed")}
        sweepers = {e["pid"] for e in proc.events("cache.sweep")}
    assert len(flushers) == 2  # both workers served and reported
    assert len(sweepers) == 1
    db = LifecycleDB(tmp_path / "cache" / "metadata")
    try:
        rows = [t for t in db.tags() if t.repo == unique_repo]
    finally:
        db.close()
    assert [(t.tag, t.digest, t.count) for t in rows] == [("v1", img.digest, requests)]
