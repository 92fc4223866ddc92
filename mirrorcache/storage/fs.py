"""Filesystem blob store: temp file + hash on the way in, verify-then-rename at commit."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
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

    @property
    def size(self) -> int:
        return self._written

    @property
    def local_path(self) -> Path | None:
        return self._path

    def _write_sync(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self._hash.update(chunk)
        total = sum(len(c) for c in chunks)
        n = os.writev(self._fd, chunks)
        if n < total:  # a short write: finish the rest piece by piece
            rest = memoryview(b"".join(chunks))[n:]
            while rest:
                rest = rest[os.write(self._fd, rest):]
        self._written += total  # only this thread (or, when idle, the loop) writes

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

    def _guarded(self, fn: Callable[[list[bytes]], None], chunks: list[bytes]) -> None:
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
            os.close(self._fd)

    async def commit(self) -> BlobInfo:
        try:
            await self.flush()
        finally:
            await self._drain_quietly()
        self._close_fd()
        self.finished = True
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
        try:
            self._path.unlink()
        except FileNotFoundError:
            pass

    async def cancel(self) -> None:
        await self._drain_quietly()
        self._close_fd()
        self.finished = True
        self._unlink()


class FsInflightClaim:
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
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def publish(self, spool: Path, size: int | None) -> None:
        self._write({"path": str(spool), "size": size})

    def fail(self, error: dict[str, Any]) -> None:
        self._write({"error": error})

    def release(self, *, done: bool) -> None:
        if done:
            with contextlib.suppress(FileNotFoundError):
                self._path.unlink()
        os.close(self._fd)


class FilesystemBlobStore:
    """Blobs in a content-addressed tree on local disk (see keys.py for the layout)."""

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
        except FileNotFoundError:
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

    async def read(self, digest: Digest, offset: int = 0, length: int | None = None
                   ) -> AsyncIterator[bytes]:
        try:
            f = open(self.path_of(digest), "rb")  # noqa: ASYNC230
        except FileNotFoundError:
            raise BlobNotFound(str(digest)) from None
        with f:
            f.seek(offset)
            remaining = length
            while remaining is None or remaining > 0:
                n = READ_CHUNK if remaining is None else min(READ_CHUNK, remaining)
                data = await asyncio.to_thread(f.read, n)
                if not data:
                    break
                if remaining is not None:
                    remaining -= len(data)
                yield data

    def reader(self, digest: Digest, offset: int = 0, length: int | None = None
               ) -> AsyncIterator[bytes]:
        """The storage protocol's name for :meth:`read` (storage/protocol.py)."""
        return self.read(digest, offset, length)

    async def read_bytes(self, digest: Digest, max_size: int) -> bytes:
        try:
            with open(self.path_of(digest), "rb") as f:  # noqa: ASYNC230  small, page-cached
                data = f.read(max_size + 1)
        except FileNotFoundError:
            raise BlobNotFound(str(digest)) from None
        except OSError as exc:
            raise StorageError(f"reading {digest}: {exc.strerror}") from exc
        if len(data) > max_size:
            raise StorageError(f"{digest} is larger than {max_size} bytes")
        return data

    async def put_bytes(self, digest: Digest, data: bytes) -> BlobInfo:
        async with self.writer(digest) as w:
            await w.write(data)
            return await w.commit()

    async def delete(self, digest: Digest) -> None:
        try:
            self.path_of(digest).unlink()
        except FileNotFoundError:
            pass

    async def list(self) -> AsyncIterator[BlobInfo]:
        for algorithm, hexlen in DIGEST_ALGORITHMS.items():
            base = self.root / keys.BLOBS_DIR / algorithm
            if not base.is_dir():
                continue
            for sub in sorted(base.iterdir()):
                entries = await asyncio.to_thread(_scan, sub)
                for name, size in entries:
                    if len(name) == hexlen:
                        yield BlobInfo(Digest(algorithm, name), size)

    def _lock_path(self, digest: Digest) -> Path:
        return self.root / keys.TMP_DIR / (keys.temp_prefix(digest) + "lock")

    def claim(self, digest: Digest) -> FsInflightClaim | None:
        """Claim the fetch of ``digest`` for this process, or None if another process has it."""
        path = self._lock_path(digest)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StorageError(f"claim {digest}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        os.ftruncate(fd, 0)
        return FsInflightClaim(fd, path)

    def peer_fetch(self, digest: Digest) -> PeerFetch:
        """Look at another process's claim on ``digest`` (alive=False when nobody holds it)."""
        try:
            fd = os.open(self._lock_path(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return PeerFetch(alive=False)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                alive = False
            except BlockingIOError:
                alive = True
            raw = os.pread(fd, 65536, 0)
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
        )

    async def cleanup_orphans(self, min_age: float = 60.0) -> int:
        """Remove partial files no live process is writing (a worker that crashed mid-fetch),
        while other processes keep running; files younger than ``min_age`` are left alone."""
        removed = 0
        now = time.time()
        for entry in os.scandir(self.root / keys.TMP_DIR):
            if not entry.name.endswith(keys.TMP_SUFFIX):
                continue
            alg, _, rest = entry.name.partition("-")
            hexpart = rest.split(".", 1)[0]
            try:
                digest = Digest(alg, hexpart)
                if now - entry.stat().st_mtime < min_age or self.peer_fetch(digest).alive:
                    continue
                os.unlink(entry.path)
                removed += 1
            except (FileNotFoundError, ValueError):
                continue
        if removed:
            log.info("storage.orphans_cleaned", files=removed)
        return removed

    async def cleanup_temp(self) -> int:
        removed = 0
        for entry in os.scandir(self.root / keys.TMP_DIR):
            if entry.name.endswith(keys.TMP_SUFFIX) or entry.name.endswith(".lock"):
                try:
                    os.unlink(entry.path)
                    removed += 1
                except FileNotFoundError:
                    pass
        if removed:
            log.info("storage.temp_cleaned", files=removed)
        return removed


def _scan(directory: Path) -> list[tuple[str, int]]:
    return sorted((e.name, e.stat().st_size) for e in os.scandir(directory) if e.is_file())
