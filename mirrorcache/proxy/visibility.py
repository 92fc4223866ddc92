"""Which repository may see which digest: the one rule every path that hands out content obeys.

Content is stored by digest, once, whatever repository asked for it first. Per-repository
access rules (upstream's and ours) would be sidestepped if any repository could read any cached
digest, so a repository is only given content by digest when

- the digest is linked to it (upstream served or confirmed it for that repository), or
- the content is being fetched from upstream for that same repository right now, or
- upstream confirms it, with a HEAD for that repository, before anything is sent.

This holds for committed content, for in-flight downloads joined in this process, for another
process's fetch followed through a claim file, and in offline mode (where nothing can be
confirmed, so only linked content is served).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

import structlog

from mirrorcache.config import UpstreamConfig
from mirrorcache.errors import ErrorCode, OCIError
from mirrorcache.oci.reference import Digest
from mirrorcache.proxy.routing import Target
from mirrorcache.storage.metadata import MetadataStore

log = structlog.get_logger("mirrorcache.visibility")

#: Asks upstream whether the asking repository holds the digest; returns its size if known and
#: raises the relayed OCIError (404 BLOB_UNKNOWN / MANIFEST_UNKNOWN) if not.
Confirm = Callable[[], Awaitable[int | None]]


class RepositoryGate:
    """Decides whether an (upstream, repository) may be handed content by digest."""

    def __init__(self, configs: Mapping[str, UpstreamConfig], meta: MetadataStore) -> None:
        self._configs = configs
        self._meta = meta

    async def linked(self, target: Target, digest: Digest) -> bool:
        return await self._meta.ais_linked(target.upstream, target.repository, digest)

    async def admit(self, target: Target, digest: Digest, *, unknown: ErrorCode, confirm: Confirm,
                    fetching_for: tuple[str, str] | None = None,
                    size: int | None = None) -> None:
        """Return if ``target`` may see ``digest``, else raise ``unknown`` (404).

        ``fetching_for`` is the (upstream, repository) an in-flight fetch of the digest runs
        for; ``size`` the size of the content we hold, checked against upstream's answer.
        """
        if fetching_for == (target.upstream, target.repository):
            return
        if await self.linked(target, digest):
            return
        if self._configs[target.upstream].offline:
            raise OCIError(unknown, f"{digest} is not known to be in {target.repository} and "
                           f"upstream {target.upstream} is offline")
        remote_size = await confirm()
        if size is not None and remote_size is not None and remote_size != size:
            raise OCIError(unknown, f"upstream size of {digest} differs from the cached one")
        log.info("visibility.confirmed", upstream=target.upstream,
                 repository=target.repository, digest=str(digest))
        await self._meta.link(target.upstream, target.repository, digest)
