"""The space guard over a real filesystem store, lifecycle database and sweeper: what it
counts between sweeps, and that a forced sweep makes room for the write that asked."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from mirrorcache.config import LifecycleConfig, RetentionConfig, SizeLimits
from mirrorcache.lifecycle.db import LifecycleDB
from mirrorcache.lifecycle.plan import build_units, plan_eviction
from mirrorcache.lifecycle.space import SpaceGuard, SpaceGuardedStore
from mirrorcache.lifecycle.sweeper import Sweeper
from mirrorcache.oci.reference import Digest
from mirrorcache.storage.base import BlobStore, StorageError
from mirrorcache.storage.fs import FilesystemBlobStore

NOW = 1_800_000_000.0


def _blob(tag: str, size: int) -> tuple[Digest, bytes]:
    data = (tag.encode() * size)[:size]
    return Digest("sha256", hashlib.sha256(data).hexdigest()), data


async def _put(store: BlobStore, tag: str, size: int, chunk: int | None = None) -> Digest:
    digest, data = _blob(tag, size)
    step = chunk or size
    async with store.writer(digest) as w:
        for i in range(0, size, step):
            await w.write(data[i:i + step])
        await w.commit()
    return digest


def _setup(tmp_path: Path, limits: SizeLimits) -> tuple[FilesystemBlobStore, LifecycleDB,
                                                        Sweeper, SpaceGuardedStore]:
    fs = FilesystemBlobStore(tmp_path / "cache")
    db = LifecycleDB(tmp_path / "meta")
    sweeper = Sweeper(fs, db, None, limits=limits, retention=RetentionConfig(),
                      lifecycle=LifecycleConfig(protect_recent=60), pins=(),
                      lock_dir=tmp_path / "cache", clock=lambda: NOW)
    return fs, db, sweeper, SpaceGuardedStore(fs, SpaceGuard(sweeper, limits))


async def _old(fs: BlobStore, db: LifecycleDB, sizes: list[int]) -> list[Digest]:
    """Blobs pulled long ago, oldest first (each its own unit: no manifest names them)."""
    out = [await _put(fs, f"old{i}", size) for i, size in enumerate(sizes)]
    db.add_access([(str(d), 1, NOW - 3600 + i, 0) for i, d in enumerate(out)], [], [])
    return out


def _on_disk(fs: FilesystemBlobStore) -> set[Digest]:
    return {Digest(p.parent.parent.name, p.name)
            for p in (fs.root / "blobs").rglob("*") if p.is_file()}


async def test_bytes_committed_between_two_sweeps_with_the_same_total_count_once(
        tmp_path: Path) -> None:
    # Two pressure sweeps that each leave 800 bytes: the guard must not take the second
    # count for the first one and add what was committed in between on top of it (it did:
    # 800 + 100 + 1 > 900, "cache full", the write refused and the pull served uncached).
    limits = SizeLimits(max_size=1000, high_watermark=0.9, low_watermark=0.85)
    fs, db, sweeper, guarded = _setup(tmp_path, limits)
    try:
        old = await _old(fs, db, [100] * 9)  # 900 bytes: at, not above, the high watermark
        assert await sweeper.sweep(trigger="test") is not None
        with capture_logs() as logs:
            # Checked at the first 1-byte chunk: 901 > 900, evict old0 -> 800, then +100.
            new1 = await _put(guarded, "new1", 100, chunk=1)
            # 900 counted + 1 > 900 again: evict old1 -> 800 again.
            new2 = await _put(guarded, "new2", 100, chunk=1)
        sweeps = [e for e in logs if e["event"] == "cache.sweep"]
        assert [(e["total"], e["after"], e["trigger"]) for e in sweeps] == [
            (900, 800, "pressure"), (900, 800, "pressure")]
        assert [e for e in logs if e["event"] == "cache.full"] == []
        assert _on_disk(fs) == {*old[2:], new1, new2}
        assert sum([i.size async for i in fs.list()]) == 900
    finally:
        db.close()


async def test_forced_sweep_makes_room_for_the_incoming_bytes(tmp_path: Path) -> None:
    # 600 bytes stored (under the 800 low watermark), a 350-byte first write: 950 is above
    # the 900 high watermark, so the sweep must evict for the incoming bytes too.
    limits = SizeLimits(max_size=1000, high_watermark=0.9, low_watermark=0.8)
    fs, db, sweeper, guarded = _setup(tmp_path, limits)
    try:
        old = await _old(fs, db, [300, 300])
        assert await sweeper.sweep(trigger="test") is not None  # counted: 600
        with capture_logs() as logs:
            new = await _put(guarded, "new", 350)
        assert [e for e in logs if e["event"] == "cache.full"] == []
        assert [(e["digest"], e["reason"]) for e in logs if e["event"] == "cache.evicted"] \
            == [(str(old[0]), "size")]
        assert _on_disk(fs) == {old[1], new}
    finally:
        db.close()


def test_reserve_evicts_what_the_write_needs_and_no_more() -> None:
    # 900 stored in nine old units, high 900, low 800. Down to the low watermark is one unit;
    # a 50-byte write then fits under the high one (850): no second unit for it. A 150-byte
    # write does not (950): one more.
    blobs = {f"b{i}": 100 for i in range(9)}
    access = {d: (float(i), 1, False) for i, d in enumerate(blobs)}

    def evicted(reserve: int) -> list[str]:
        units = build_units(blobs, access, {}, set())
        plan = plan_eviction(blobs, units, now=1000.0, max_size=1000, high=0.9, low=0.8,
                             free=None, min_free=0, unused_for=None, protect_recent=10,
                             recent_blobs=set(), force=True, reserve=reserve)
        return [e.root for e in plan.evictions]

    assert evicted(0) == ["b0"]
    assert evicted(50) == ["b0"]
    assert evicted(150) == ["b0", "b1"]


async def test_cache_full_when_everything_is_recent(tmp_path: Path) -> None:
    # Nothing evictable (all pulled within protect_recent): the write is refused, the
    # recent content stays.
    limits = SizeLimits(max_size=1000, high_watermark=0.9, low_watermark=0.8)
    fs, db, sweeper, guarded = _setup(tmp_path, limits)
    try:
        recent = [await _put(fs, f"r{i}", 300) for i in range(2)]
        db.add_access([(str(d), 1, NOW - 5, 0) for d in recent], [], [])
        assert await sweeper.sweep(trigger="test") is not None  # counted: 600
        with capture_logs() as logs, pytest.raises(StorageError, match="cache full"):
            await _put(guarded, "new", 350)
        assert [e["incoming"] for e in logs if e["event"] == "cache.full"] == [350]
        assert _on_disk(fs) == set(recent)
    finally:
        db.close()
