"""The blob store protocol every backend implements (issue 9's shape; reconcile with base.py).

Filesystem, S3 and the tiered store (a local disk tier in front of S3) all satisfy
:class:`BlobStore`. Things only a local filesystem can do (cross-process claim files) are a
separate, optional capability, not methods every backend fakes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Protocol, runtime_checkable

from mirrorcache.oci.reference import Digest
from mirrorcache.storage.base import BlobInfo, BlobWriter


@runtime_checkable
class BlobStore(Protocol):
    """A content-addressed blob store."""

    async def stat(self, digest: Digest) -> BlobInfo | None: ...

    def reader(self, digest: Digest, offset: int = 0, length: int | None = None
               ) -> AsyncIterator[bytes]:
        """The bytes ``[offset, offset+length)`` in chunks; raises BlobNotFound."""

    def writer(self, digest: Digest) -> AbstractAsyncContextManager[BlobWriter]:
        """``async with store.writer(d) as w: await w.write(b); await w.commit()``.

        Leaving the block without a commit cancels the write.
        """

    async def delete(self, digest: Digest) -> None: ...

    def list(self) -> AsyncIterator[BlobInfo]: ...

    def local_path(self, digest: Digest) -> Path | None:
        """Path of a committed blob on local disk (for sendfile), or None when not local."""
