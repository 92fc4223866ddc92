"""Drop-behind of a direct download's spool (``FsBlobWriter.release``, driven by
``_pump_direct`` from the readers' positions): pages behind the slowest reader leave the page
cache once on disk; pages a reader still needs stay; the bytes and digest are untouched."""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import mmap
import os
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from mirrorcache.oci.reference import Digest
from mirrorcache.proxy import download
from mirrorcache.proxy.download import Download, _pump_direct
from mirrorcache.proxy.routing import Target
from mirrorcache.storage import fs
from mirrorcache.storage.fs import FilesystemBlobStore
from mirrorcache.upstream.registry import RawBody

MiB = 1 << 20
PAGE = mmap.PAGESIZE

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]

pytestmark = pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="Linux only")


def resident_pages(path: Path) -> list[int]:
    """Offsets of the pages of ``path`` that are in the page cache (one mincore call)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value)
        try:
            vec = ctypes.create_string_buffer((size + PAGE - 1) // PAGE)
            assert _libc.mincore(addr, size, vec) == 0
            return [i * PAGE for i, b in enumerate(vec.raw) if b & 1]
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def resident(path: Path, start: int, end: int) -> int:
    """Bytes of ``path`` in [start, end) that are in the page cache."""
    return sum(PAGE for off in resident_pages(path) if start <= off < end)


async def pump(tmp_path: Path, data: bytes, dl_setup: Callable[[Download], None],
               ) -> tuple[list[int], Download]:
    """Receive ``data`` through ``_pump_direct`` over a socket pair into a filesystem store,
    the Download prepared by ``dl_setup`` (readers, the switch); check the committed bytes.
    Returns which pages of the spool were in the page cache when the pump ended (after an
    fsync, so every page is clean), as the page offsets, and the Download."""
    store = FilesystemBlobStore(tmp_path / "cache")
    digest = Digest.parse("sha256:" + hashlib.sha256(data).hexdigest())
    ours, theirs = socket.socketpair()
    ours.settimeout(30)
    raw = RawBody("up", ours, b"", len(data))
    dl = Download(Target("up", "r"), digest)
    dl_setup(dl)
    sender = asyncio.get_running_loop().run_in_executor(None, theirs.sendall, data)
    try:
        async with store.writer(digest) as w:
            assert await _pump_direct(raw, w, dl) is None
            assert w.local_path is not None
            os.fsync(w._fd)
            pages = resident_pages(w.local_path)
            await w.commit()
    finally:
        await sender
        theirs.close()
        raw.close()
    assert store.path_of(digest).read_bytes() == data
    return pages, dl


@pytest.fixture
def small_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small windows, and writeback that is done when started (the real one only starts
    it: how much is clean in time to be dropped then depends on the disk)."""
    monkeypatch.setattr(download, "KEEP_BEHIND", 8 * MiB)
    monkeypatch.setattr(fs, "WRITEBACK_STEP", 4 * MiB)
    monkeypatch.setattr(fs, "_start_writeback", lambda fd, offset, length: os.fdatasync(fd))


async def test_released_pages_leave_the_page_cache(tmp_path: Path) -> None:
    data = os.urandom(24 * MiB)
    store = FilesystemBlobStore(tmp_path / "cache")
    digest = Digest.parse("sha256:" + hashlib.sha256(data).hexdigest())

    async with store.writer(digest) as w:
        w.write_direct(memoryview(data))
        assert w.local_path is not None
        os.fsync(w._fd)
        assert resident(w.local_path, 0, len(data)) == len(data)  # via the page cache
        w.release(16 * MiB)
        assert resident(w.local_path, 0, 16 * MiB) == 0  # released, and clean: gone
        assert resident(w.local_path, 16 * MiB, len(data)) == 8 * MiB  # not released
        await w.commit()
    assert store.path_of(digest).read_bytes() == data


async def test_direct_download_drops_its_spool_behind_when_nobody_reads(
        tmp_path: Path, small_windows: None) -> None:
    pages, _ = await pump(tmp_path, os.urandom(64 * MiB), lambda dl: None)
    # Everything but the last KEEP_BEHIND (and a writeback step or two) went.
    assert len(pages) * PAGE <= 16 * MiB


async def test_pages_a_reader_still_needs_stay(tmp_path: Path, small_windows: None) -> None:
    def readers(dl: Download) -> None:
        dl.reader_at("slow", 40 * MiB)  # has sent 40 MiB, the rest still to read
        dl.reader_at("fast", 60 * MiB)
        assert dl.readers_low == 40 * MiB

    pages, dl = await pump(tmp_path, os.urandom(64 * MiB), readers)
    # Nothing from the slow reader's position (less KEEP_BEHIND) on was dropped; all of
    # what is behind that went.
    assert pages == list(range(32 * MiB, 64 * MiB, PAGE))
    dl.reader_left("slow")
    assert dl.readers_low == 60 * MiB
    dl.reader_left("fast")
    assert dl.readers_low == download.NO_READER


async def test_drop_behind_off_keeps_the_page_cache(tmp_path: Path, small_windows: None
                                                    ) -> None:
    def off(dl: Download) -> None:
        dl.drop_behind = False  # storage.drop_behind: false

    pages, _ = await pump(tmp_path, os.urandom(32 * MiB), off)
    assert pages == list(range(0, 32 * MiB, PAGE))


async def test_release_without_fadvise_is_a_no_op(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the platform has no posix_fadvise (macOS), drop-behind does nothing, and the
    download goes on: it must not raise into the receiving thread."""
    monkeypatch.setattr(fs, "_HAS_FADVISE", False)
    monkeypatch.delattr(os, "posix_fadvise")
    data = os.urandom(24 * MiB)
    store = FilesystemBlobStore(tmp_path / "cache")
    digest = Digest.parse("sha256:" + hashlib.sha256(data).hexdigest())
    async with store.writer(digest) as w:
        w.write_direct(memoryview(data))
        w.release(len(data))
        await w.commit()
    assert store.path_of(digest).read_bytes() == data


def test_readers_low_follows_the_slowest_reader() -> None:
    dl = Download(Target("up", "r"), Digest.parse("sha256:" + "0" * 64))
    assert dl.readers_low == download.NO_READER
    dl.reader_at("a", 10)
    dl.reader_at("b", 30)
    dl.reader_at("c", 5)  # a new slowest
    assert dl.readers_low == 5
    dl.reader_at("a", 40)  # not the slowest: no change
    assert dl.readers_low == 5
    dl.reader_at("c", 50)  # the slowest moves past the others
    assert dl.readers_low == 30
    dl.reader_left("b")
    assert dl.readers_low == 40
    dl.reader_left("a")
    dl.reader_left("c")
    assert dl.readers_low == download.NO_READER
