"""The storage interface: content-addressed blobs, streamed in with verification, out with ranges.

A backend knows nothing of registries. Manifests and layers are both blobs here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from mirrorcache.oci.reference import Digest


class StorageError(Exception):
    """The backend failed (disk full, permission, network to object storage).

    Every backend operation raises this (never a bare OSError) when storage fails, so callers
    have one failure path: serve uncached from upstream."""


class BlobNotFound(StorageError):
    """No committed blob has this digest."""


class DigestMismatch(StorageError):
    """The bytes written do not hash to the digest they were written under."""

    def __init__(self, expected: Digest, actual: str, size: int) -> None:
        self.expected = expected
        self.actual = actual
        self.size = size
        super().__init__(f"expected {expected}, got {actual} over {size} bytes")


@dataclass(frozen=True, slots=True)
class BlobInfo:
    """What a backend knows of a committed blob."""

    digest: Digest
    size: int


@dataclass(frozen=True, slots=True)
class PeerFetch:
    """What another process on this host said of its in-flight fetch of a digest."""

    alive: bool
    path: Path | None = None
    size: int | None = None
    error: dict[str, Any] | None = None
    #: Whom the peer fetches for (an opaque label the caller published), if it said.
    owner: str | None = None


class InflightClaim(Protocol):
    """This process's exclusive claim on fetching a digest, visible to other processes."""

    def publish(self, spool: Path, size: int | None, owner: str | None = None) -> None:
        """Say where the bytes land, how many there will be and whom they are fetched for.
        Raises StorageError."""

    def fail(self, error: dict[str, Any]) -> None:
        """Say why the fetch failed (OCI code, message, status). Raises StorageError."""

    def release(self, *, done: bool) -> None:
        """Give the claim up (never raises); nothing of it is left behind."""


class BlobWriter(Protocol):
    """An in-progress write; the digest is computed as bytes arrive and checked at commit."""

    digest: Digest

    @property
    def size(self) -> int:
        """Bytes written so far."""

    @property
    def local_path(self) -> Path | None:
        """A local file holding the bytes written so far, readable while writing (or None)."""

    async def write(self, chunk: bytes) -> None: ...

    async def flush(self) -> None:
        """Wait until everything written so far is in ``local_path`` (``size`` counts it)."""

    async def commit(self) -> BlobInfo:
        """Verify the digest and publish atomically; raise DigestMismatch and discard otherwise."""

    async def cancel(self) -> None:
        """Discard everything written."""


class BlobStore(Protocol):
    """A content-addressed blob store."""

    async def stat(self, digest: Digest) -> BlobInfo | None: ...

    def writer(self, digest: Digest) -> AbstractAsyncContextManager[BlobWriter]:
        """``async with store.writer(d) as w: await w.write(b); await w.commit()``.

        Leaving the block without a commit cancels the write.
        """

    def local_path(self, digest: Digest) -> Path | None:
        """Path of a committed blob on local disk (for sendfile), or None for remote backends."""

    def read(self, digest: Digest, offset: int = 0, length: int | None = None
             ) -> AsyncIterator[bytes]: ...

    async def read_bytes(self, digest: Digest, max_size: int) -> bytes: ...

    async def put_bytes(self, digest: Digest, data: bytes) -> BlobInfo: ...

    async def delete(self, digest: Digest) -> None: ...

    def list(self) -> AsyncIterator[BlobInfo]: ...

    async def cleanup_temp(self) -> int:
        """Remove temporary files left by a crash; return how many."""

    async def cleanup_orphans(self, min_age: float = 60.0) -> int:
        """Remove temporary files that no live process is writing."""

    def claim(self, digest: Digest) -> InflightClaim | None:
        """Claim the fetch of a digest for this process (None: another process has it)."""

    def peer_fetch(self, digest: Digest) -> PeerFetch:
        """What another process's claim on a digest says."""
