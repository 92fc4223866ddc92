"""Disk pressure at write time: a write that would cross the high watermark runs the
sweeper first; if that cannot make room, the write fails with StorageError, which is the
existing storage-failure path (the pull continues from upstream, uncached, in bypass).

The check costs a look at the last sweep's count (shared in the lifecycle database, with the
wall time it was counted at) plus the bytes this process committed after that moment, and
``statvfs`` for ``min_free``; it runs at a writer's first write and then every
``CHECK_EVERY`` bytes, never per chunk. Commits are told apart from the count by time, not by
the total changing: two sweeps can leave the same total, and what was committed between them
is in the second count (counting it again refused writes on a cache with room to spare).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import structlog

from mirrorcache.config import SizeLimits
from mirrorcache.lifecycle.sweeper import Sweeper
from mirrorcache.oci.reference import Digest
from mirrorcache.storage.base import BlobInfo, BlobStore, BlobWriter, StorageError

log = structlog.get_logger("mirrorcache.lifecycle")

CHECK_EVERY = 8 << 20
#: How long a write waits for another process's sweep to finish before deciding.
SWEEP_WAIT = 10.0
#: The shared total is re-read at most this often.
REFRESH_EVERY = 2.0


class SpaceGuard:
    def __init__(self, sweeper: Sweeper, limits: SizeLimits,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._sweeper = sweeper
        self._limits = limits
        self._clock = clock
        self._base = 0.0
        #: (wall time, size) of this process's commits not yet in ``_base``, oldest first.
        self._commits: deque[tuple[float, int]] = deque()
        self._added = 0
        self._read_at = -1e18
        self._lock = asyncio.Lock()

    def committed(self, size: int) -> None:
        self._commits.append((time.time(), size))  # the clock the sweeper stamps counts with
        self._added += size

    async def _used(self) -> float:
        if self._clock() - self._read_at >= REFRESH_EVERY:
            count = await asyncio.to_thread(self._sweeper.used_count)
            if count is not None:
                self._base, counted_at = count
                while self._commits and self._commits[0][0] <= counted_at:
                    self._added -= self._commits.popleft()[1]  # in that count already
            self._read_at = self._clock()
        return self._base + self._added

    async def _over(self, incoming: int) -> str | None:
        lim = self._limits
        if lim.max_size is not None:
            used = await self._used()
            if used + incoming > lim.max_size * lim.high_watermark:
                return f"cache at {used:.0f} of {lim.max_size} bytes"
        if lim.min_free:
            free = self._sweeper.free_bytes()
            if free is not None and free - incoming < lim.min_free:
                return f"{free} bytes free, min_free is {lim.min_free}"
        return None

    async def check(self, incoming: int) -> None:
        """Make room for ``incoming`` more bytes or raise StorageError."""
        if await self._over(incoming) is None:
            return
        async with self._lock:  # one sweep per process at a time
            self._read_at = -1e18
            if await self._over(incoming) is None:
                return
            deadline = self._clock() + SWEEP_WAIT
            while True:
                result = await self._sweeper.sweep(trigger="pressure", force=True,
                                                   reserve=incoming)
                if result is not None or self._clock() >= deadline:
                    break
                await asyncio.sleep(0.1)  # another process is sweeping: wait for it
            self._read_at = -1e18
            why = await self._over(incoming)
        if why is not None:
            log.warning("cache.full", reason=why, incoming=incoming)
            raise StorageError(f"cache full after sweeping: {why}")


class GuardedWriter:
    def __init__(self, inner: BlobWriter, guard: SpaceGuard) -> None:
        self._inner = inner
        self._guard = guard
        self._unchecked = 0
        self._checked = False
        self.digest = inner.digest
        self._loop = asyncio.get_running_loop()

    @property
    def size(self) -> int:
        return self._inner.size

    @property
    def local_path(self) -> Path | None:
        return self._inner.local_path

    async def write(self, chunk: bytes) -> None:
        self._unchecked += len(chunk)
        if not self._checked or self._unchecked >= CHECK_EVERY:
            await self._guard.check(self._unchecked)
            self._unchecked, self._checked = 0, True
        await self._inner.write(chunk)

    async def flush(self) -> None:
        await self._inner.flush()

    async def commit(self) -> BlobInfo:
        info = await self._inner.commit()
        self._guard.committed(info.size)
        return info

    async def cancel(self) -> None:
        await self._inner.cancel()

    def _write_direct(self, data: memoryview) -> None:
        """``write_direct`` with the guard: runs in the receiving thread, so the check is
        handed to the event loop and waited for, at the first write and every CHECK_EVERY."""
        self._unchecked += len(data)
        if not self._checked or self._unchecked >= CHECK_EVERY:
            asyncio.run_coroutine_threadsafe(self._guard.check(self._unchecked),
                                             self._loop).result()
            self._unchecked, self._checked = 0, True
        self._inner.write_direct(data)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> Any:
        if name == "write_direct":  # only when the inner writer has it (a DirectWriter)
            getattr(self._inner, name)
            return self._write_direct
        return getattr(self._inner, name)


class SpaceGuardedStore:
    """A blob store whose writers check for room first; everything else is the store's."""

    def __init__(self, inner: BlobStore, guard: SpaceGuard) -> None:
        self._inner = inner
        self._guard = guard

    @asynccontextmanager
    async def writer(self, digest: Digest) -> AsyncIterator[GuardedWriter]:
        async with self._inner.writer(digest) as w:
            yield GuardedWriter(w, self._guard)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)
