"""The sweeper: plan over what the store lists, then delete image by image.

It uses only ``list``, ``delete`` and ``local_path`` of a blob store, so it applies to any
backend whose content (or local tier) it is given. One sweep at a time across every process
on the host: ``flock`` on ``<cache>/lifecycle.sweep.lock`` (non-blocking: a busy lock means
someone else is sweeping). The periodic background sweep runs in one process only: the one
holding ``<cache>/lifecycle.leader.lock`` (the kernel hands it to another process if that
one dies).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from mirrorcache.config import LifecycleConfig, RetentionConfig, SizeLimits
from mirrorcache.lifecycle.access import AccessTracker
from mirrorcache.lifecycle.db import LifecycleDB, TagEntry
from mirrorcache.lifecycle.pins import Pins
from mirrorcache.lifecycle.plan import Plan, build_units, plan_eviction
from mirrorcache.metrics import Metrics
from mirrorcache.oci import media
from mirrorcache.oci.reference import Digest
from mirrorcache.storage.base import BlobStore, StorageError
from mirrorcache.storage.metadata import Metadata

log = structlog.get_logger("mirrorcache.lifecycle")

SWEEP_LOCK = "lifecycle.sweep.lock"
LEADER_LOCK = "lifecycle.leader.lock"


@contextlib.contextmanager
def try_flock(path: Path) -> Iterator[bool]:
    """Hold an exclusive flock on ``path`` for the block if it is free (yields False if not)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def manifest_children(body: bytes) -> list[str] | None:
    """The digests a manifest references (config, layers; an index's manifests), or None
    when ``body`` is not an image manifest."""
    if not body.lstrip().startswith(b"{"):
        return None
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    if not isinstance(doc, dict) or doc.get("schemaVersion") != 2:
        return None
    out: list[str] = []
    descriptors: list[Any] = []
    if isinstance(doc.get("config"), dict):
        descriptors.append(doc["config"])
    for key in ("layers", "manifests", "blobs"):
        if isinstance(doc.get(key), list):
            descriptors.extend(doc[key])
    if not descriptors and "manifests" not in doc:
        return None
    for d in descriptors:
        if isinstance(d, dict) and isinstance(d.get("digest"), str):
            out.append(d["digest"])
    return out


@dataclass
class Gathered:
    now: float
    blobs: dict[str, int]
    #: Wall time (``time.time``, not the injected clock) just after listing ``blobs``: a
    #: commit stamped later is not in this count (see SpaceGuard).
    counted_at: float
    access: dict[str, tuple[float, int, bool]]
    refs: dict[str, list[str]]
    manifests: set[str]
    tags: list[TagEntry]


@dataclass
class SweepResult:
    plan: Plan
    freed: int
    images: int


class Sweeper:
    """Plans and carries out eviction for one cache tier."""

    def __init__(self, store: BlobStore, db: LifecycleDB, meta: Metadata | None, *,
                 limits: SizeLimits, retention: RetentionConfig, lifecycle: LifecycleConfig,
                 pins: tuple[str, ...], lock_dir: Path,
                 tracker: AccessTracker | None = None, metrics: Metrics | None = None,
                 backend: str = "filesystem", free_path: Path | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.db = db
        self.meta = meta
        self.limits = limits
        self.retention = retention
        self.lifecycle = lifecycle
        self.pins = pins
        self.lock_dir = lock_dir
        self.tracker = tracker
        self.metrics = metrics
        self.backend = backend
        self.free_path = free_path
        self.clock = clock

    # -- gathering
    async def _blobs(self) -> dict[str, int]:
        return {str(info.digest): info.size async for info in self.store.list()}

    def free_bytes(self) -> int | None:
        if self.free_path is None:
            return None
        try:
            return shutil.disk_usage(self.free_path).free
        except OSError:
            return None

    async def index_manifests(self, blobs: dict[str, int], *, save: bool = True
                              ) -> list[tuple[str, bool, list[str]]]:
        """Parse, once, every small blob not looked at yet that may be a manifest (lazily
        built image -> blob graph; manifests are immutable)."""
        parsed = await asyncio.to_thread(self.db.parsed)
        todo = [d for d, size in blobs.items()
                if d not in parsed and size <= media.MAX_MANIFEST_BYTES]
        if not todo:
            return []

        def read_all() -> list[tuple[str, bool, list[str]]]:
            out = []
            for d in todo:
                path = self.store.local_path(Digest(*d.split(":", 1)))
                if path is None:
                    continue  # a remote store without a local tier: see README
                try:
                    with open(path, "rb") as f:
                        first = f.read(1)
                        body = first + f.read() if first == b"{" else b""
                except OSError:
                    continue
                children = manifest_children(body) if body else None
                out.append((d, children is not None, children or []))
            return out

        results = await asyncio.to_thread(read_all)
        if save:
            await asyncio.to_thread(self.db.set_parsed, results)
        return results

    async def gather(self, *, save: bool = True) -> Gathered:
        """What the store holds and what is known of it; ``save=False`` writes nothing
        (``gc --dry-run``)."""
        if self.tracker is not None:
            await self.tracker.flush()
        now = self.clock()
        blobs = await self._blobs()
        counted_at = time.time()
        fresh = await self.index_manifests(blobs, save=save)
        access = await asyncio.to_thread(self.db.access)
        unseen = [d for d in blobs if d not in access]
        if unseen:
            if save:
                await asyncio.to_thread(self.db.first_seen, unseen, now)
            access.update({d: (now, 0, False) for d in unseen})
        parsed = await asyncio.to_thread(self.db.parsed)
        refs = await asyncio.to_thread(self.db.refs)
        for d, is_manifest, children in fresh:
            parsed[d] = is_manifest
            if children:
                refs[d] = children
        manifests = {d for d, m in parsed.items() if m}
        manifests.update(d for d, (_, _, m) in access.items() if m)
        tags = await asyncio.to_thread(self.db.tags)
        return Gathered(now, blobs, counted_at, access, refs, manifests, tags)

    async def plan(self, *, force: bool = False, save: bool = True, reserve: int = 0
                   ) -> Plan:
        g = await self.gather(save=save)
        now, blobs, access, tags = g.now, g.blobs, g.access, g.tags
        units = build_units(blobs, access, g.refs, g.manifests)
        pins = Pins([*self.pins, *await asyncio.to_thread(self.db.pins)])
        by_digest: dict[str, list[str]] = {}
        pinned: dict[str, str] = {}
        for t in tags:
            name = f"{t.upstream}/{t.repo}" + (f":{t.tag}" if t.tag else f"@{t.digest}")
            by_digest.setdefault(t.digest, []).append(name)
            if pins:
                hit = pins.matches(t.upstream, t.repo, t.tag or None,
                                   Digest(*t.digest.split(":", 1)))
                if hit is not None:
                    pinned.setdefault(t.digest, hit)
        for u in units:
            for m in u.manifests:
                u.names.extend(by_digest.get(m, ()))
                u.pinned = u.pinned or pinned.get(m)
        lc = self.lifecycle
        recent = {d for d, (last, _, _) in access.items() if last >= now - lc.protect_recent}
        plan = plan_eviction(
            blobs, units, now=now, max_size=self.limits.max_size,
            high=self.limits.high_watermark, low=self.limits.low_watermark,
            free=self.free_bytes(), min_free=self.limits.min_free,
            unused_for=self.retention.unused_for, protect_recent=lc.protect_recent,
            recent_blobs=recent, force=force, reserve=reserve)
        plan = dataclasses.replace(plan, counted_at=g.counted_at)
        if save:
            await asyncio.to_thread(self.db.set_used, plan.total, plan.counted_at)
        if self.metrics is not None:
            self.metrics.cache_bytes.labels(self.backend).set(plan.total)
        return plan

    # -- carrying out
    async def execute(self, plan: Plan) -> SweepResult:
        freed = images = 0
        for ev in plan.evictions:
            deleted = 0
            try:
                for d in ev.delete:  # manifests first: no new pull of it starts here
                    await self.store.delete(Digest(*d.split(":", 1)))
                    deleted += 1
            except StorageError as exc:
                log.warning("cache.evict_failed", root=ev.root, error=str(exc))
            gone = await asyncio.to_thread(self.db.forget, list(ev.delete[:deleted]))
            if self.meta is not None:
                for up, repo, tag, d in gone:
                    digest = Digest(*d.split(":", 1))
                    if tag:
                        await self.meta.drop_tag(up, repo, tag, digest)
                    await self.meta.forget(up, repo, digest)
            images += 1
            freed += ev.freed
            if self.metrics is not None:
                self.metrics.evicted_bytes.labels(ev.reason).inc(ev.freed)
                self.metrics.evicted_images.inc()
            log.info("cache.evicted", digest=ev.root, names=list(ev.names), reason=ev.reason,
                     bytes=ev.freed, blobs=len(ev.delete), last_pulled=ev.last,
                     pulls=ev.pulls)
        if plan.evictions:
            await asyncio.to_thread(self.db.set_used, plan.total - freed, plan.counted_at)
            if self.metrics is not None:
                self.metrics.cache_bytes.labels(self.backend).set(plan.total - freed)
        return SweepResult(plan, freed, images)

    @contextlib.asynccontextmanager
    async def _locked(self) -> AsyncIterator[bool]:
        with try_flock(self.lock_dir / SWEEP_LOCK) as got:
            yield got

    async def sweep(self, *, force: bool = False, trigger: str = "interval",
                    dry_run: bool = False, show: Callable[[Plan], None] | None = None,
                    reserve: int = 0) -> SweepResult | None:
        """One sweep, or None when another process is sweeping right now. ``show`` sees
        the plan before it is carried out; ``dry_run`` stops there. ``reserve``: bytes a
        write is about to add (room is made for them too)."""
        async with self._locked() as got:
            if not got:
                return None
            started = time.monotonic()
            plan = await self.plan(force=force, save=not dry_run, reserve=reserve)
            if show is not None:
                show(plan)
            if dry_run:
                return SweepResult(plan, 0, 0)
            result = await self.execute(plan)
            log.info("cache.sweep", pid=os.getpid(), trigger=trigger, total=plan.total,
                     after=plan.total - result.freed, freed=result.freed,
                     images=result.images, limit=plan.limit,
                     duration_ms=round((time.monotonic() - started) * 1000, 1))
            return result

    def used_estimate(self) -> float | None:
        return self.db.state("used_bytes")

    def used_count(self) -> tuple[float, float] | None:
        """(bytes, wall time counted at) of the last sweep's count."""
        return self.db.used()


async def background(sweeper: Sweeper, tracker: AccessTracker, *, flush_interval: float,
                     sweep_interval: float) -> None:
    """Flush this process's access counts every ``flush_interval``; in the leader process,
    sweep every ``sweep_interval``."""
    leader_fd: int | None = None
    next_sweep = time.monotonic() + sweep_interval
    try:
        while True:
            await asyncio.sleep(min(flush_interval, max(next_sweep - time.monotonic(), 0)))
            await tracker.flush()
            if time.monotonic() < next_sweep:
                continue
            next_sweep = time.monotonic() + sweep_interval
            if leader_fd is None:
                leader_fd = _try_lead(sweeper.lock_dir / LEADER_LOCK)
                if leader_fd is None:
                    used = await asyncio.to_thread(sweeper.used_estimate)
                    if used is not None and sweeper.metrics is not None:
                        sweeper.metrics.cache_bytes.labels(sweeper.backend).set(used)
                    continue
                log.info("lifecycle.sweeper_leader", pid=os.getpid())
            try:
                await sweeper.sweep()
            except (OSError, StorageError) as exc:
                log.warning("cache.sweep_failed", error=str(exc))
    finally:
        if leader_fd is not None:
            os.close(leader_fd)


def _try_lead(path: Path) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
