"""Single-flight coalescing: one run per key, shared results and errors, detached work."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from mirrorcache.coalesce import Coalescer


class Work:
    """Work that blocks until released; counts how often it ran and whether it was cancelled."""

    def __init__(self, result: Any = None, error: BaseException | None = None) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.runs = 0
        self.cancelled = False
        self.finished = False
        self.result = result if result is not None else object()
        self.error = error

    async def __call__(self) -> Any:
        self.runs += 1
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        self.finished = True
        if self.error is not None:
            raise self.error
        return self.result


async def test_twenty_callers_share_one_run() -> None:
    c = Coalescer()
    work = Work()
    tasks = [asyncio.create_task(c.run("key", work)) for _ in range(20)]
    await work.started.wait()
    assert c.is_running("key")
    assert len(c) == 1
    work.release.set()
    results = await asyncio.gather(*tasks)
    assert work.runs == 1
    assert all(r[0] is work.result for r in results)
    assert sorted(joined for _, joined in results) == [False] + [True] * 19
    assert len(c) == 0 and not c.is_running("key")


async def test_exception_reaches_every_waiter() -> None:
    c = Coalescer()
    boom = ValueError("upstream exploded")
    work = Work(error=boom)
    tasks = [asyncio.create_task(c.run("key", work)) for _ in range(20)]
    await work.started.wait()
    work.release.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert work.runs == 1
    assert len(results) == 20
    assert all(r is boom for r in results)
    assert len(c) == 0


@pytest.mark.parametrize("victim", [0, 1])  # 0: the caller that started the work
async def test_cancelling_one_waiter_does_not_cancel_the_work(victim: int) -> None:
    c = Coalescer()
    work = Work(result="done")
    tasks = [asyncio.create_task(c.run("key", work)) for _ in range(3)]
    await work.started.wait()
    tasks[victim].cancel()
    with pytest.raises(asyncio.CancelledError):
        await tasks[victim]
    assert c.is_running("key")
    assert not work.cancelled
    work.release.set()
    others = [t for i, t in enumerate(tasks) if i != victim]
    assert [r[0] for r in await asyncio.gather(*others)] == ["done", "done"]
    assert work.runs == 1 and work.finished and not work.cancelled


async def test_work_continues_when_every_waiter_leaves() -> None:
    c = Coalescer()
    work = Work(result="late")
    task = asyncio.create_task(c.run("key", work))
    await work.started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert c.is_running("key")
    # A caller arriving now joins the still-running work instead of starting another.
    joiner = asyncio.create_task(c.run("key", work))
    work.release.set()
    assert await joiner == ("late", True)
    assert work.runs == 1 and work.finished


async def test_different_keys_run_separately() -> None:
    c = Coalescer()
    a, b = Work(result="A"), Work(result="B")
    ta = [asyncio.create_task(c.run(("manifest", "a"), a)) for _ in range(3)]
    tb = [asyncio.create_task(c.run(("manifest", "b"), b)) for _ in range(3)]
    await a.started.wait()
    await b.started.wait()
    assert len(c) == 2
    b.release.set()
    assert [r[0] for r in await asyncio.gather(*tb)] == ["B"] * 3
    assert c.is_running(("manifest", "a")) and not c.is_running(("manifest", "b"))
    a.release.set()
    assert [r[0] for r in await asyncio.gather(*ta)] == ["A"] * 3
    assert (a.runs, b.runs) == (1, 1)


async def test_finished_key_runs_again() -> None:
    c = Coalescer()
    work = Work(result="x")
    work.release.set()
    assert await c.run("key", work) == ("x", False)
    assert await c.run("key", work) == ("x", False)
    assert work.runs == 2
    assert len(c) == 0


async def test_aclose_cancels_inflight_work() -> None:
    c = Coalescer()
    work = Work()
    task = asyncio.create_task(c.run("key", work))
    await work.started.wait()
    await c.aclose()
    assert work.cancelled
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(c) == 0
