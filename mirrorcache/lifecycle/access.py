"""Pull counts and times, batched in memory: a dict update per request, no I/O, no lock.

Each process keeps its own deltas and flushes them (periodically and at shutdown) into the
shared lifecycle database, where counts add up and times take the max, so ``--workers N``
needs no coordination on the hot path. A flush swaps the dicts out first (the event loop is
single-threaded; the swap is atomic with respect to ``record_*``).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable

import structlog

from mirrorcache.lifecycle.db import AccessRow, LifecycleDB, TagRow
from mirrorcache.oci.reference import Digest

log = structlog.get_logger("mirrorcache.lifecycle")


class AccessTracker:
    """Per-process pull counters. ``clock`` is wall time (tests inject one)."""

    def __init__(self, db: LifecycleDB | None,
                 clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self._clock = clock
        # (upstream, repo, tag or '', digest) -> [count, last]
        self._manifests: dict[tuple[str, str, str, Digest], list[float]] = {}
        # (upstream, repo, digest) -> [count, last]
        self._blobs: dict[tuple[str, str, Digest], list[float]] = {}
        self.enabled = db is not None

    def manifest(self, upstream: str, repository: str, tag: str | None,
                 digest: Digest) -> None:
        """A manifest was served (GET)."""
        if not self.enabled:
            return
        key = (upstream, repository, tag or "", digest)
        entry = self._manifests.get(key)
        if entry is None:
            self._manifests[key] = [1, self._clock()]
        else:
            entry[0] += 1
            entry[1] = self._clock()

    def blob(self, upstream: str, repository: str, digest: Digest) -> None:
        """A blob was served (GET), from the cache or an in-flight fetch."""
        if not self.enabled:
            return
        key = (upstream, repository, digest)
        entry = self._blobs.get(key)
        if entry is None:
            self._blobs[key] = [1, self._clock()]
        else:
            entry[0] += 1
            entry[1] = self._clock()

    @property
    def pending(self) -> int:
        return len(self._manifests) + len(self._blobs)

    async def flush(self) -> None:
        """Write the deltas gathered since the last flush (dropped if the write fails)."""
        if self._db is None or not (self._manifests or self._blobs):
            return
        manifests, self._manifests = self._manifests, {}
        blobs, self._blobs = self._blobs, {}
        access: dict[str, list[float]] = {}
        tags: list[TagRow] = []
        for (up, repo, tag, digest), (count, last) in manifests.items():
            d = str(digest)
            tags.append((up, repo, tag, d, int(count), last))
            a = access.setdefault(d, [0, 0.0, 1])
            a[0] += count
            a[1] = max(a[1], last)
            a[2] = 1
        repos: list[tuple[str, str, str]] = []
        for (up, repo, digest), (count, last) in blobs.items():
            d = str(digest)
            repos.append((d, up, repo))
            a = access.setdefault(d, [0, 0.0, 0])
            a[0] += count
            a[1] = max(a[1], last)
        rows: list[AccessRow] = [(d, int(c), t, int(m)) for d, (c, t, m) in access.items()]
        try:
            await asyncio.to_thread(self._db.add_access, rows, tags, repos)
        except Exception as exc:  # never fails a request; counts are best effort
            log.warning("lifecycle.flush_failed", error=str(exc), dropped=len(rows))
            return
        log.info("lifecycle.flushed", pid=os.getpid(), digests=len(rows),
                 pulls=int(sum(c for _, c, _, _ in rows)))
