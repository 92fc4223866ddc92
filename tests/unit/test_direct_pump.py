"""The direct receive thread (proxy/download.py ``_pump_direct``) over a socket pair: bytes
and digest, a body cut short, and a cancelled download whose thread must stop before the
writer is closed."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import mmap
import os
import socket
import threading
import time
import types
from collections.abc import Callable
from pathlib import Path

import pytest

from mirrorcache.oci.reference import Digest
from mirrorcache.proxy import download
from mirrorcache.proxy.download import DIRECT_BUFFER, DirectSink, Download, _pump_direct, _Ring
from mirrorcache.proxy.routing import Target
from mirrorcache.storage.base import StorageError
from mirrorcache.storage.fs import FilesystemBlobStore
from mirrorcache.upstream.registry import RawBody


def fetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("mirrorcache-fetch-")]


def send(sock: socket.socket, data: bytes, *, close: bool) -> threading.Thread:
    """Send from a thread (a socket pair buffers less than the body)."""
    def run() -> None:
        sock.sendall(data)
        if close:
            sock.close()
    t = threading.Thread(target=run)
    t.start()
    return t


def setup(tmp_path: Path, data: bytes, head: int
          ) -> tuple[FilesystemBlobStore, Digest, Download, socket.socket, RawBody]:
    store = FilesystemBlobStore(tmp_path / "cache")
    digest = Digest.parse("sha256:" + hashlib.sha256(data).hexdigest())
    ours, theirs = socket.socketpair()
    raw = RawBody("up", ours, data[:head], len(data))
    ours.settimeout(30)
    return store, digest, Download(Target("up", "r"), digest), theirs, raw


async def test_whole_body_lands_hashed_with_buffered_head(tmp_path: Path) -> None:
    data = os.urandom(3 * DIRECT_BUFFER + 12345)
    store, digest, dl, theirs, raw = setup(tmp_path, data, 1000)
    sender = asyncio.get_running_loop().run_in_executor(None, theirs.sendall, data[1000:])
    async with store.writer(digest) as w:
        assert await _pump_direct(raw, w, dl) is None
        assert dl.written == w.size == len(data)
        await w.commit()
    await sender
    theirs.close()
    raw.close()
    assert await store.stat(digest) is not None
    assert (store.path_of(digest)).read_bytes() == data


async def test_body_cut_short_reports_the_break_and_keeps_the_bytes(tmp_path: Path) -> None:
    data = os.urandom(2 * DIRECT_BUFFER)
    store, digest, dl, theirs, raw = setup(tmp_path, data, 0)
    sender = send(theirs, data[:DIRECT_BUFFER + 7], close=True)
    async with store.writer(digest) as w:
        assert await _pump_direct(raw, w, dl) == "ClientPayloadError"
        sender.join()
        assert dl.written == w.size == DIRECT_BUFFER + 7
        assert w.local_path is not None
        assert w.local_path.read_bytes() == data[:DIRECT_BUFFER + 7]
    raw.close()
    assert await store.stat(digest) is None


async def test_cancelled_download_stops_its_thread_first(tmp_path: Path) -> None:
    data = os.urandom(2 * DIRECT_BUFFER)
    store, digest, dl, theirs, raw = setup(tmp_path, data, 0)
    sender = send(theirs, data[:DIRECT_BUFFER + 1000], close=False)  # then silence
    loop = asyncio.get_running_loop()
    async with store.writer(digest) as w:
        task = asyncio.create_task(_pump_direct(raw, w, dl))
        deadline = loop.time() + 10
        while w.size < DIRECT_BUFFER:
            assert loop.time() < deadline
            await asyncio.sleep(0.01)
        assert len(fetch_threads()) == 2  # the receiving thread and the writing one
        began = loop.time()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert loop.time() - began < 5
        assert fetch_threads() == []  # joined before the writer could be closed
        # What had arrived when the thread was woken is good and kept; nothing else.
        assert w.size == DIRECT_BUFFER + 1000
        assert w.local_path is not None
        assert w.local_path.read_bytes() == data[:DIRECT_BUFFER + 1000]
    sender.join()
    theirs.close()
    raw.close()
    assert list((tmp_path / "cache" / "tmp").glob("*.part")) == []


async def test_cancel_waits_for_the_thread_without_blocking_the_loop(tmp_path: Path) -> None:
    """The thread may be waiting on the event loop (the space guard's check runs there):
    a cancelled pump joins it off the loop, so the loop still runs what the thread waits
    for. Here the writer's write waits for a loop callback (2 s at most)."""
    data = os.urandom(DIRECT_BUFFER)
    store, digest, dl, theirs, raw = setup(tmp_path, data, 0)
    sender = send(theirs, data, close=False)
    loop = asyncio.get_running_loop()
    entered, released = threading.Event(), threading.Event()
    by_loop: list[bool] = []

    def waits_on_loop() -> None:
        entered.set()
        by_loop.append(released.wait(2))

    async with store.writer(digest) as w:
        task = asyncio.create_task(_pump_direct(raw, _Hooked(w, waits_on_loop), dl))  # type: ignore[arg-type]
        assert await asyncio.to_thread(entered.wait, 10)
        task.cancel()
        loop.call_soon(released.set)  # runs only if the loop is not blocked by the join
        with pytest.raises(asyncio.CancelledError):
            await task
        assert by_loop == [True]
        assert fetch_threads() == []
    sender.join()
    theirs.close()
    raw.close()


class _Hooked:
    """A store writer whose every ``write_direct`` first runs ``before`` (which may wait,
    or raise); everything else is the writer's."""

    def __init__(self, inner: object, before: Callable[[], object]) -> None:
        self.inner = inner
        self.before = before

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def write_direct(self, buf: memoryview) -> None:
        self.before()
        self.inner.write_direct(buf)  # type: ignore[attr-defined]


async def test_loan_ended_mid_stretch_is_told_once_that_stretch_is_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lent client whose socket takes only part of a stretch ends the loan: its reader
    goes on from the spool where the thread got to (inside that stretch), so the loop must
    hear of the stretch once it is written, while upstream is silent (not only at upstream's
    next bytes). NOTIFY_SECONDS is long here, so only that tell can tell it."""
    monkeypatch.setattr(download, "NOTIFY_SECONDS", 3600.0)
    data = os.urandom(3 * DIRECT_BUFFER)
    store, digest, dl, theirs, raw = setup(tmp_path, data, 0)
    dl.size, dl.threaded = len(data), True
    sender = send(theirs, data[:DIRECT_BUFFER], close=False)  # then silence
    client, peer = socket.socketpair()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    client.setblocking(False)
    loop = asyncio.get_running_loop()
    async with store.writer(digest) as w:
        assert w.local_path is not None
        spool = os.open(w.local_path, os.O_RDONLY)
        sink = DirectSink(client, spool, 0, len(data))
        assert dl.lend(sink)
        task = asyncio.create_task(_pump_direct(raw, _Hooked(w, lambda: time.sleep(0.1)), dl))  # type: ignore[arg-type]
        deadline = loop.time() + 3
        while dl.written < DIRECT_BUFFER and loop.time() < deadline:
            await asyncio.sleep(0.01)
        assert not sink.lent
        assert 0 < sink.pos < DIRECT_BUFFER
        assert dl.written == w.size == DIRECT_BUFFER  # told, upstream still silent
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert fetch_threads() == []
        os.close(spool)
    sender.join()
    for s in (theirs, client, peer):
        s.close()
    raw.close()


async def test_storage_failure_ends_the_pump_while_upstream_is_silent(tmp_path: Path) -> None:
    """The writing thread fails (disk full) while the receiving one waits on a silent
    upstream: the pump raises the StorageError now (its readers go on from upstream), not
    once upstream sends a whole buffer more or its read times out (30 s here)."""
    data = os.urandom(3 * DIRECT_BUFFER)
    store, digest, dl, theirs, raw = setup(tmp_path, data, 0)
    sender = send(theirs, data[:DIRECT_BUFFER + 1000], close=False)  # then silence

    def full() -> None:
        raise StorageError("disk full")

    loop = asyncio.get_running_loop()
    async with store.writer(digest) as w:
        began = loop.time()
        task = asyncio.create_task(_pump_direct(raw, _Hooked(w, full), dl))  # type: ignore[arg-type]
        done, _ = await asyncio.wait([task], timeout=5)
        if not done:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert done, "the pump waited for upstream after the writer failed"
        with pytest.raises(StorageError):
            task.result()
        assert loop.time() - began < 5
        assert fetch_threads() == []
    sender.join()
    theirs.close()
    raw.close()


async def test_writing_thread_that_cannot_start_fails_the_pump(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No thread left for the writing one (``can't start new thread``): the pump raises, as
    when the receiving thread cannot start, instead of waiting forever (and with it every
    client of the blob)."""
    class NoWriter(threading.Thread):
        def start(self) -> None:
            if self.name.endswith("-w"):
                raise RuntimeError("can't start new thread")
            super().start()

    monkeypatch.setattr(download, "threading", types.SimpleNamespace(
        Thread=NoWriter, Event=threading.Event, Condition=threading.Condition))
    data = os.urandom(DIRECT_BUFFER)
    store, digest, dl, theirs, raw = setup(tmp_path, data, 0)
    async with store.writer(digest) as w:
        task = asyncio.create_task(_pump_direct(raw, w, dl))
        done, _ = await asyncio.wait([task], timeout=5)
        if not done:
            raw.abort()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert done, "the pump waits for a writing thread that never started"
        with pytest.raises(RuntimeError):
            task.result()
        assert fetch_threads() == []
    theirs.close()
    raw.close()


def test_ring_buffer_handed_over_after_the_writer_failed_is_still_unmapped() -> None:
    """The receiving thread may hand over a buffer it filled while the writing thread
    failed: that buffer is never written, and its map is closed like the others."""
    ring = _Ring(3, mmap.PAGESIZE)
    view = ring.acquire()
    assert view is not None
    ring.fail(StorageError("disk full"))
    ring.submit(view, 10)
    ring.close()
    assert ring.take() is None
    ring.release()
    assert all(area.closed for area in ring._areas)


async def test_cancelled_twice_still_joins_the_threads_first(tmp_path: Path) -> None:
    """A second cancellation while the pump waits for its threads (shutdown after a client
    went away, say) must not let it return, and the store writer be closed, under a
    writing thread that still has stretches to write."""
    data = os.urandom(DIRECT_BUFFER)
    store, digest, dl, theirs, raw = setup(tmp_path, data, 0)
    sender = send(theirs, data, close=False)
    entered, released = threading.Event(), threading.Event()

    def slow_disk() -> None:  # the write takes a while
        entered.set()
        released.wait(2)

    async with store.writer(digest) as w:
        task = asyncio.create_task(_pump_direct(raw, _Hooked(w, slow_disk), dl))  # type: ignore[arg-type]
        assert await asyncio.to_thread(entered.wait, 10)
        task.cancel()
        await asyncio.sleep(0.05)  # now joining the threads
        task.cancel()
        await asyncio.sleep(0.05)
        alive_when_cancelled_twice = [t for t in fetch_threads()]
        released.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert alive_when_cancelled_twice  # the second cancel came while they ran
        assert fetch_threads() == []  # and the pump still returned only after joining them
    sender.join()
    theirs.close()
    raw.close()
