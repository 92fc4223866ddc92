"""Single-flight: concurrent callers with the same key share one run of the work.

The work runs in its own task, detached from the callers: a caller that goes away (client
disconnect) does not cancel it for the others. Every waiter sees the same result or error.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, TypeVar

T = TypeVar("T")


class Coalescer:
    """In-flight work keyed by (kind, ...); owned by the app, never a module global."""

    def __init__(self) -> None:
        self._inflight: dict[Hashable, asyncio.Task[Any]] = {}

    def __len__(self) -> int:
        return len(self._inflight)

    def is_running(self, key: Hashable) -> bool:
        return key in self._inflight

    async def run(self, key: Hashable, work: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        """Run ``work`` once per key at a time; return (result, whether we joined a run)."""
        task = self._inflight.get(key)
        joined = task is not None
        if task is None:
            task = asyncio.ensure_future(work())
            self._inflight[key] = task
            task.add_done_callback(functools.partial(self._done, key))
        result: T = await asyncio.shield(task)
        return result, joined

    def _done(self, key: Hashable, task: asyncio.Task[Any]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # mark retrieved: waiters re-raise it themselves

    async def aclose(self) -> None:
        """Cancel in-flight work (shutdown)."""
        tasks = list(self._inflight.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
