"""The storage interface: content-addressed blobs, streamed in with verification, out with ranges.

A backend knows nothing of registries. Manifests and layers are both blobs here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

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
    """A content-addressed blob store: the whole of what a backend must offer.

    Every method raises StorageError (never a bare OSError) when the backend fails.
    What only some backends can do is a separate capability (:class:`FetchClaims`,
    :class:`Janitor`), wired in app.py.
    """

    async def stat(self, digest: Digest) -> BlobInfo | None:
        """The committed blob's size, or None if there is none."""

    def reader(self, digest: Digest, offset: int = 0, length: int | None = None
               ) -> AsyncIterator[bytes]:
        """The bytes ``offset``..``offset+length`` (to the end when ``length`` is None) of a
        committed blob. Raises BlobNotFound (when iterated) if there is none."""

    def writer(self, digest: Digest) -> AbstractAsyncContextManager[BlobWriter]:
        """``async with store.writer(d) as w: await w.write(b); await w.commit()``.

        Leaving the block without a commit cancels the write. Concurrent writers of one
        digest are allowed: each commits the same bytes, the blob is published once.
        """

    async def delete(self, digest: Digest) -> None:
        """Remove a committed blob (nothing happens if there is none)."""

    def list(self) -> AsyncIterator[BlobInfo]:
        """Every committed blob."""

    def local_path(self, digest: Digest) -> Path | None:
        """Path of a committed blob on local disk (for sendfile), or None when the backend
        keeps blobs elsewhere (then serve with :meth:`reader`)."""


@dataclass(frozen=True, slots=True)
class PeerFetch:
    """What another process on this host said of its in-flight fetch (see FetchClaims)."""

    alive: bool
    path: Path | None = None
    size: int | None = None
    error: dict[str, Any] | None = None
    #: Whom the peer fetches for (an opaque label the caller published), if it said.
    owner: str | None = None


class FetchClaim(Protocol):
    """This process's exclusive claim on fetching something (a blob, a manifest, a tag),
    visible to the other processes sharing the store."""

    def publish(self, spool: Path | None, size: int | None, owner: str | None = None) -> None:
        """Say where the bytes land, how many there will be and whom they are fetched for.
        Raises StorageError."""

    def fail(self, error: dict[str, Any]) -> None:
        """Say why the fetch failed (OCI code, message, status). Raises StorageError."""

    def release(self, *, done: bool) -> None:
        """Give the claim up (never raises); nothing of it is left behind."""


@runtime_checkable
class FetchClaims(Protocol):
    """Optional capability: cross-process single-flight on one host (the filesystem store's
    claim files). Without it a service single-flights per process only.

    Keys are strings: ``blob:<digest>``, ``manifest:<upstream>/<repo>@<digest>``,
    ``tag:<upstream>/<repo>:<tag>`` (see :func:`blob_claim_key`).
    """

    def claim(self, key: str) -> FetchClaim | None:
        """Claim the fetch of ``key`` for this process (None: another process has it).
        Raises StorageError."""

    def peer_fetch(self, key: str) -> PeerFetch:
        """What another process's claim on ``key`` says (alive=False when nobody holds it).
        Raises StorageError."""


@runtime_checkable
class VerifiesEarly(Protocol):
    """Optional capability of a :class:`BlobWriter` whose ``commit`` is slow (an upload to
    object storage): check the digest first, so the verified bytes can be served while the
    store publishes them."""

    async def verify(self) -> None:
        """Flush and check the digest of everything written; raise DigestMismatch (and
        discard the write) otherwise. ``commit`` must still be called to publish."""


@runtime_checkable
class LocalTier(Protocol):
    """Optional capability of a store shared by replicas with a local tier per replica (S3
    behind a local disk tier): a replica teeing another replica's fetch keeps its copy
    locally and leaves publishing the blob in the shared store to the replica fetching it."""

    def local_writer(self, digest: Digest) -> AbstractAsyncContextManager[BlobWriter]:
        """A writer into this replica's local tier only (verified at commit like any write);
        nothing reaches the shared store."""

    async def publish_local(self, digest: Digest) -> bool:
        """Upload the local tier's verified copy to the shared store unless it is already
        there; True if it uploaded. Raises StorageError."""


@runtime_checkable
class Janitor(Protocol):
    """Optional capability: a backend that leaves temporary files behind a crash."""

    async def cleanup_temp(self) -> int:
        """Remove every temporary file (at start-up, no other process running); how many."""

    async def cleanup_orphans(self, min_age: float = 60.0) -> int:
        """Remove temporary files no live process is writing, older than ``min_age``."""


def blob_claim_key(digest: Digest) -> str:
    """The claim key of an upstream blob fetch."""
    return f"blob:{digest}"


async def read_bytes(store: BlobStore, digest: Digest, max_size: int) -> bytes:
    """A whole small blob (a manifest). Raises BlobNotFound, or StorageError when it is
    larger than ``max_size``."""
    parts: list[bytes] = []
    got = 0
    async for chunk in store.reader(digest, 0, max_size + 1):
        parts.append(chunk)
        got += len(chunk)
    if got > max_size:
        raise StorageError(f"{digest} is larger than {max_size} bytes")
    return b"".join(parts)


async def put_bytes(store: BlobStore, digest: Digest, data: bytes) -> BlobInfo:
    """Store a small blob in one write. Raises DigestMismatch or StorageError."""
    async with store.writer(digest) as w:
        await w.write(data)
        return await w.commit()
