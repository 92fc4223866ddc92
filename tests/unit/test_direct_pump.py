"""The direct receive thread (proxy/download.py ``_pump_direct``) over a socket pair: bytes
and digest, a body cut short, and a cancelled download whose thread must stop before the
writer is closed."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import threading
from pathlib import Path

import pytest

from mirrorcache.oci.reference import Digest
from mirrorcache.proxy.download import DIRECT_BUFFER, Download, _pump_direct
from mirrorcache.proxy.routing import Target
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

    class WaitsOnLoop:
        def __init__(self, inner: object) -> None:
            self.inner = inner

        def __getattr__(self, name: str) -> object:
            return getattr(self.inner, name)

        def write_direct(self, buf: memoryview) -> None:
            entered.set()
            by_loop.append(released.wait(2))
            self.inner.write_direct(buf)  # type: ignore[attr-defined]

    async with store.writer(digest) as w:
        task = asyncio.create_task(_pump_direct(raw, WaitsOnLoop(w), dl))  # type: ignore[arg-type]
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
