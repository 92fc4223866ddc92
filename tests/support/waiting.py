"""Waiting for a condition in tests: polled, with a deadline, never a fixed sleep."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def wait_until(cond: Callable[[], object], *, timeout: float = 10.0,
                     interval: float = 0.02, what: str = "condition") -> None:
    """Return as soon as ``cond()`` is true; raise TimeoutError naming ``what`` after
    ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() >= deadline:
            raise TimeoutError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(interval)
