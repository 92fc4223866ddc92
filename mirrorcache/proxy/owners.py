"""What the proxy asks of a cluster of replicas (implemented by ``mirrorcache.cluster``).

A replica that misses a blob or manifest it does not own asks the owner instead of upstream;
the owner fetches once and streams. Without a cluster the services get ``owners=None``.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from mirrorcache.oci.reference import Digest
from mirrorcache.proxy.routing import Target
from mirrorcache.upstream.registry import BlobBody


def blob_key(digest: Digest | str) -> str:
    """Who fetches a blob: owned per digest."""
    return f"blob:{digest}"


def manifest_key(digest: Digest | str) -> str:
    """Who fetches a manifest by digest: owned per digest."""
    return f"manifest:{digest}"


def tag_key(upstream: str, repository: str, tag: str) -> str:
    """Who revalidates a tag: owned per (upstream, repository, tag)."""
    return f"tag:{upstream}/{repository}:{tag}"


class BlobOpener(Protocol):
    """Where a Download reads a blob body from (upstream's RegistryClient, or the owner)."""

    def open_blob(self, repo: str, digest: Digest, offset: int = 0,
                  end: int | None = None) -> AbstractAsyncContextManager[BlobBody]: ...


@runtime_checkable
class OwnerStream(Protocol):
    """A BlobOpener that streams from the owning replica: the owner publishes the blob in
    the shared store, unless ``owner_failed`` (it could not answer, or its stream broke and
    this replica fetched the rest upstream)."""

    owner_failed: bool


@dataclass(frozen=True, slots=True)
class OwnedManifest:
    """A manifest as the owning replica answered it (its digest not yet checked)."""

    digest: Digest
    media_type: str
    body: bytes


class Owners(Protocol):
    """Ownership of keys across replicas, and asking the owner."""

    def blob_source(self, target: Target, digest: Digest, upstream: BlobOpener
                    ) -> BlobOpener | None:
        """A source that streams the blob from its owner (and falls back to ``upstream``
        if the owner is unreachable or slow), or None when this replica owns it."""
        ...

    async def manifest(self, key: str, target: Target, reference: str
                       ) -> OwnedManifest | None:
        """The owner's answer for ``reference`` (a tag or a digest), or None when this
        replica owns ``key`` or the owner could not answer (then fetch it yourself). The
        owner's refusals (404, 403) are raised as OCIError."""
        ...
