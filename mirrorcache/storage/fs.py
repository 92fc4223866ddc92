"""Filesystem blob store: temp file + hash on the way in, verify-then-rename at commit."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import ctypes
import fcntl
import hashlib
import json
import mmap
import os
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import structlog

from mirrorcache.oci.reference import DIGEST_ALGORITHMS, Digest
from mirrorcache.storage import keys
from mirrorcache.storage.base import (
    BlobInfo,
    BlobNotFound,
    DigestMismatch,
    PeerFetch,
    StorageError,
    blob_claim_key,
)

log = structlog.get_logger("mirrorcache.storage")

READ_CHUNK = 1 << 20
#: Chunks smaller than this are written inline when nothing is queued (manifests).
SYNC_WRITE_MAX = 64 * 1024
#: Bytes gathered before a write is handed to the writer thread.
WRITE_BATCH = 1 << 20
#: Writes queued to the writer thread before ``write`` waits (bounds memory per download).
MAX_PENDING_WRITES = 4
#: Chunks per writev (well under IOV_MAX).
MAX_IOVEC = 256
#: Drop-behind (:meth:`FsBlobWriter.release`): writeback of a spool is started in stretches
#: of this size as they land.
WRITEBACK_STEP = 16 << 20


class FsBlobWriter:
    """A write into ``tmp/``. Hashing and writing run in the writer's own thread, pipelined:
    ``write`` returns while earlier chunks are still being hashed, so the event loop keeps
    reading the network meanwhile. ``size`` counts bytes that have landed in the file."""

    def __init__(self, store: FilesystemBlobStore, digest: Digest) -> None:
        self.digest = digest
        self._store = store
        self._hash = hashlib.new(digest.algorithm)
        name = keys.temp_prefix(digest) + secrets.token_hex(6) + keys.TMP_SUFFIX
        self._path = store.root / keys.TMP_DIR / name
        self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        self._written = 0
        self._buf: list[bytes] = []
        self._buf_len = 0
        self._pending: deque[asyncio.Future[None]] = deque()
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False
        self.finished = False
        self._writeback_from = 0  # drop-behind: writeback started below this offset
        self._dropped_until = 0  # and pages dropped below this one

    @property
    def size(self) -> int:
        return self._written

    @property
    def local_path(self) -> Path | None:
        return self._path

    def _write_sync(self, chunks: list[bytes] | list[memoryview]) -> None:
        for chunk in chunks:
            self._hash.update(chunk)
        total = sum(len(c) for c in chunks)
        n = os.writev(self._fd, chunks)
        if n < total:  # a short write: finish the rest piece by piece
            rest = memoryview(b"".join(chunks))[n:]
            while rest:
                rest = rest[os.write(self._fd, rest):]
        self._written += total  # only this thread (or, when idle, the loop) writes

    def write_direct(self, data: memoryview) -> None:
        """Hash and write ``data`` now, blocking, from the one thread that feeds this writer
        while nothing else does (call :meth:`flush` first): the fast path of a download that
        receives its body in a thread. ``size`` grows as each call returns."""
        if self._closed:
            raise StorageError("write after close")
        self._guarded(self._write_sync, [data])

    def release(self, until: int) -> None:
        """Drop-behind, blocking, from the thread that feeds :meth:`write_direct`: nobody
        will read the spool before ``until`` soon, so its page cache may go once it is on
        disk. Writeback starts for every full WRITEBACK_STEP landed; clean pages before
        ``until`` are dropped (pages still being written back stay, and get one more chance
        next time). A large blob written into fresh page cache costs several times the CPU
        of one written into pages just freed (on a VM, every first touch of a page reaches
        the hypervisor), so a download that lets its pages go behind its readers reuses the
        same few MiB of memory. A reader that comes later reads the spool from disk.
        Advisory: errors are ignored."""
        if self._closed or not _HAS_FADVISE:
            return
        try:
            while self._written - self._writeback_from >= WRITEBACK_STEP:
                _start_writeback(self._fd, self._writeback_from, WRITEBACK_STEP)
                self._writeback_from += WRITEBACK_STEP
            until = min(until, self._writeback_from) // mmap.PAGESIZE * mmap.PAGESIZE
            if until > self._dropped_until:
                start = max(self._dropped_until - 2 * WRITEBACK_STEP, 0)
                os.posix_fadvise(self._fd, start, until - start, os.POSIX_FADV_DONTNEED)
                self._dropped_until = until
        except OSError:
            pass

    async def write(self, chunk: bytes) -> None:
        if self._closed:
            raise StorageError("write after close")
        if not self._pending and not self._buf and len(chunk) < SYNC_WRITE_MAX:
            self._guarded(self._write_sync, [chunk])  # small and nothing queued: inline
            return
        self._buf.append(chunk)
        self._buf_len += len(chunk)
        if self._buf_len >= WRITE_BATCH or len(self._buf) >= MAX_IOVEC:
            await self._submit()

    async def _submit(self) -> None:
        buf, self._buf, self._buf_len = self._buf, [], 0
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="mirrorcache-write")
        loop = asyncio.get_running_loop()
        self._pending.append(loop.run_in_executor(self._executor, self._write_sync, buf))
        while len(self._pending) > MAX_PENDING_WRITES:
            await self._wait(self._pending.popleft())

    async def _wait(self, fut: asyncio.Future[None]) -> None:
        try:
            await fut
        except OSError as exc:
            raise StorageError(f"writing {self.digest}: {exc.strerror}") from exc

    def _guarded(self, fn: Callable[[Any], None], chunks: list[bytes] | list[memoryview]
                 ) -> None:
        try:
            fn(chunks)
        except OSError as exc:
            raise StorageError(f"writing {self.digest}: {exc.strerror}") from exc

    async def flush(self) -> None:
        """Wait until every byte written so far has landed in the file."""
        if self._buf:
            await self._submit()
        while self._pending:
            await self._wait(self._pending.popleft())

    async def _drain_quietly(self) -> None:
        while self._pending:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await self._pending.popleft()
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None

    def _close_fd(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                os.close(self._fd)
            except OSError as exc:  # e.g. a delayed write error reported at close
                raise StorageError(f"closing {self.digest}: {exc.strerror}") from exc

    async def commit(self) -> BlobInfo:
        try:
            await self.flush()
        finally:
            await self._drain_quietly()
        self.finished = True
        try:
            self._close_fd()
        except StorageError:
            self._unlink()
            raise
        actual = self._hash.hexdigest()
        if actual != self.digest.hex:
            self._unlink()
            raise DigestMismatch(self.digest, f"{self.digest.algorithm}:{actual}", self._written)
        final = self._store.path_of(self.digest)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists():
                self._unlink()  # content-addressed: someone else committed the same bytes
            else:
                os.replace(self._path, final)
        except OSError as exc:
            self._unlink()
            raise StorageError(f"committing {self.digest}: {exc.strerror}") from exc
        return BlobInfo(self.digest, self._written)

    def _unlink(self) -> None:
        _unlink_quietly(self._path)

    async def cancel(self) -> None:
        await self._drain_quietly()
        self.finished = True
        with contextlib.suppress(StorageError):
            self._close_fd()
        self._unlink()


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):  # not Linux
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()
#: posix_fadvise is Linux's (and some BSDs'); without it drop-behind does nothing.
_HAS_FADVISE = hasattr(os, "posix_fadvise")
_SYNC_FILE_RANGE_WRITE = 2


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing a range of a file back to disk, without waiting (``sync_file_range``
    with ``SYNC_FILE_RANGE_WRITE``; the GIL is released during the call)."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def _unlink_quietly(path: Path) -> None:
    """Remove a file of ours; gone already is fine, any other failure is logged, not raised."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("storage.unlink_failed", path=str(path), error=exc.strerror)


class FsFetchClaim:
    """A flock-based claim: this process fetches a digest; other processes on the host tail its
    spool file.

    The claim is an exclusive ``flock`` on ``tmp/<alg>-<hex>.lock``, released by closing the
    file (or by the kernel when the process dies); the file's content says where the spool
    file is and how large the blob will be, or why the fetch failed.
    """

    def __init__(self, fd: int, path: Path) -> None:
        self._fd = fd
        self._path = path

    def _write(self, doc: dict[str, Any]) -> None:
        data = json.dumps(doc).encode()
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, data, 0)
        except OSError as exc:
            raise StorageError(f"claim file {self._path.name}: {exc.strerror}") from exc

    def publish(self, spool: Path | None, size: int | None, owner: str | None = None) -> None:
        self._write({"path": str(spool) if spool is not None else None, "size": size,
                     "owner": owner})

    def fail(self, error: dict[str, Any]) -> None:
        self._write({"error": error})

    def release(self, *, done: bool) -> None:
        """Remove the claim file (while still holding the lock, so nobody can be handed a
        lock on a file that is gone) and close it; nothing is left in tmp/ either way.
        A follower that finds no claim file looks for the blob, then fetches it itself."""
        _unlink_quietly(self._path)
        with contextlib.suppress(OSError):
            os.close(self._fd)


class FilesystemBlobStore:
    """Blobs in a content-addressed tree on local disk (see keys.py for the layout).

    A :class:`~mirrorcache.storage.base.BlobStore` with both optional capabilities:
    :class:`~mirrorcache.storage.base.FetchClaims` (flock'd claim files, so the worker
    processes sharing the directory fetch each thing once) and
    :class:`~mirrorcache.storage.base.Janitor` (crash leftovers in tmp/)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / keys.BLOBS_DIR).mkdir(parents=True, exist_ok=True)
        (root / keys.TMP_DIR).mkdir(parents=True, exist_ok=True)

    def path_of(self, digest: Digest) -> Path:
        return self.root / keys.blob_key(digest)

    def local_path(self, digest: Digest) -> Path | None:
        return self.path_of(digest)

    async def stat(self, digest: Digest) -> BlobInfo | None:
        try:
            st = os.stat(self.path_of(digest))
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise StorageError(f"stat {digest}: {exc.strerror}") from exc
        return BlobInfo(digest, st.st_size)

    @asynccontextmanager
    async def writer(self, digest: Digest) -> AsyncIterator[FsBlobWriter]:
        try:
            w = FsBlobWriter(self, digest)
        except OSError as exc:
            raise StorageError(f"creating temp file: {exc.strerror}") from exc
        try:
            yield w
        finally:
            if not w.finished:
                await w.cancel()

    async def reader(self, digest: Digest, offset: int = 0, length: int | None = None
                     ) -> AsyncIterator[bytes]:
        try:
            f = open(self.path_of(digest), "rb")  # noqa: ASYNC230
        except FileNotFoundError:
            raise BlobNotFound(str(digest)) from None
        except OSError as exc:
            raise StorageError(f"reading {digest}: {exc.strerror}") from exc
        with f:
            remaining = length
            while remaining is None or remaining > 0:
                n = READ_CHUNK if remaining is None else min(READ_CHUNK, remaining)
                try:
                    data = await asyncio.to_thread(os.pread, f.fileno(), n, offset)
                except OSError as exc:
                    raise StorageError(f"reading {digest}: {exc.strerror}") from exc
                offset += len(data)
                if not data:
                    break
                if remaining is not None:
                    remaining -= len(data)
                yield data

    async def delete(self, digest: Digest) -> None:
        try:
            self.path_of(digest).unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StorageError(f"deleting {digest}: {exc.strerror}") from exc

    async def list(self) -> AsyncIterator[BlobInfo]:
        for algorithm, hexlen in DIGEST_ALGORITHMS.items():
            base = self.root / keys.BLOBS_DIR / algorithm
            if not base.is_dir():
                continue
            try:
                subs = sorted(base.iterdir())
            except OSError as exc:
                raise StorageError(f"listing {base}: {exc.strerror}") from exc
            for sub in subs:
                try:
                    entries = await asyncio.to_thread(_scan, sub)
                except OSError as exc:
                    raise StorageError(f"listing {sub}: {exc.strerror}") from exc
                for name, size in entries:
                    if len(name) == hexlen:
                        yield BlobInfo(Digest(algorithm, name), size)

    def _lock_path(self, key: str) -> Path:
        return self.root / keys.TMP_DIR / keys.claim_file(key)

    def claim(self, key: str) -> FsFetchClaim | None:
        """Claim the fetch of ``key`` for this process, or None if another process has it."""
        path = self._lock_path(key)
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise StorageError(f"claim {key}: {exc.strerror}") from exc
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    return None
                # The previous holder may have removed the file between our open and flock:
                # a lock on a file no longer at ``path`` claims nothing. Try again.
                try:
                    same = os.path.samestat(os.fstat(fd), os.stat(path))
                except FileNotFoundError:
                    same = False
                if not same:
                    os.close(fd)
                    continue
                os.ftruncate(fd, 0)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.close(fd)
                raise StorageError(f"claim {key}: {exc.strerror}") from exc
            return FsFetchClaim(fd, path)

    def peer_fetch(self, key: str) -> PeerFetch:
        """Look at another process's claim on ``key`` (alive=False when nobody holds it)."""
        return self._peer_at(self._lock_path(key))

    def _peer_at(self, path: Path) -> PeerFetch:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return PeerFetch(alive=False)
        except OSError as exc:
            raise StorageError(f"claim {path.name}: {exc.strerror}") from exc
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                alive = False
            except BlockingIOError:
                alive = True
            raw = os.pread(fd, 65536, 0)
        except OSError as exc:
            raise StorageError(f"claim {path.name}: {exc.strerror}") from exc
        finally:
            os.close(fd)
        try:
            doc = json.loads(raw) if raw else {}
        except ValueError:
            doc = {}
        return PeerFetch(
            alive=alive,
            path=Path(doc["path"]) if isinstance(doc.get("path"), str) else None,
            size=doc.get("size") if isinstance(doc.get("size"), int) else None,
            error=doc.get("error") if isinstance(doc.get("error"), dict) else None,
            owner=doc.get("owner") if isinstance(doc.get("owner"), str) else None,
        )

    async def cleanup_orphans(self, min_age: float = 60.0) -> int:
        """Remove partial and claim files no live process holds (a worker that crashed
        mid-fetch), while other processes keep running; files younger than ``min_age`` are
        left alone."""
        removed = 0
        now = time.time()
        for entry in self._tmp_entries():
            if not entry.name.endswith((keys.TMP_SUFFIX, ".lock")):
                continue
            try:
                if entry.name.endswith(".lock"):
                    lock = Path(entry.path)  # a claim file: is it still held?
                else:  # a partial blob: is its fetch's claim still held?
                    alg, _, rest = entry.name.partition("-")
                    lock = self._lock_path(blob_claim_key(Digest(alg, rest.split(".", 1)[0])))
                if now - entry.stat().st_mtime < min_age or self._peer_at(lock).alive:
                    continue
                os.unlink(entry.path)
                removed += 1
            except (FileNotFoundError, ValueError):
                continue
            except (OSError, StorageError) as exc:
                log.warning("storage.cleanup_failed", path=entry.path, error=str(exc))
        if removed:
            log.info("storage.orphans_cleaned", files=removed)
        return removed

    def _tmp_entries(self) -> builtins.list[os.DirEntry[str]]:
        try:
            with os.scandir(self.root / keys.TMP_DIR) as it:
                return list(it)
        except OSError as exc:
            raise StorageError(f"listing tmp/: {exc.strerror}") from exc

    async def cleanup_temp(self) -> int:
        removed = 0
        for entry in self._tmp_entries():
            if entry.name.endswith(keys.TMP_SUFFIX) or entry.name.endswith(".lock"):
                try:
                    os.unlink(entry.path)
                    removed += 1
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    raise StorageError(f"removing {entry.name}: {exc.strerror}") from exc
        if removed:
            log.info("storage.temp_cleaned", files=removed)
        return removed


def _scan(directory: Path) -> list[tuple[str, int]]:
    return sorted((e.name, e.stat().st_size) for e in os.scandir(directory) if e.is_file())
