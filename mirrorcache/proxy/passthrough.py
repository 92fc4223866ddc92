"""Endpoints relayed to upstream as they are: tag listing and referrers."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from mirrorcache.config import UpstreamConfig
from mirrorcache.errors import ErrorCode, OCIError
from mirrorcache.oci.reference import Digest
from mirrorcache.proxy.routing import Target
from mirrorcache.proxy.upstreams import Upstreams
from mirrorcache.upstream.registry import RegistryClient


@dataclass(frozen=True, slots=True)
class Relayed:
    """An upstream answer to hand back to the client."""

    status: int
    body: bytes
    content_type: str
    link: str | None


class PassthroughService:
    """Relays listing endpoints, which a mirror cannot answer better than its upstream."""

    def __init__(self, upstreams: Upstreams, configs: Mapping[str, UpstreamConfig]) -> None:
        self._upstreams = upstreams
        self._configs = configs

    def _client(self, target: Target) -> RegistryClient:
        if self._configs[target.upstream].offline:
            raise OCIError(ErrorCode.UNAVAILABLE,
                           f"upstream {target.upstream} is offline", status=503)
        return self._upstreams[target.upstream]

    async def tags(self, target: Target, params: Mapping[str, str]) -> Relayed:
        listing = await self._client(target).list_tags(target.repository, params)
        return Relayed(200, listing.body, listing.content_type, listing.link)

    async def referrers(self, target: Target, digest: Digest, params: Mapping[str, str]
                        ) -> Relayed:
        listing = await self._client(target).referrers(target.repository, digest, params)
        return Relayed(200, listing.body, listing.content_type, listing.link)


def paginate_tags(relayed: Relayed, params: Mapping[str, str]) -> tuple[Relayed, str | None]:
    """Apply ``n``/``last`` ourselves when the upstream ignored them (Distribution 2.x does).

    Returns the page and, if more tags follow, the ``last`` value for the next page.
    """
    if relayed.link or not params:
        return relayed, None
    try:
        doc = json.loads(relayed.body)
        tags = sorted(t for t in doc["tags"] if isinstance(t, str))
    except (ValueError, KeyError, TypeError):
        return relayed, None
    last = params.get("last")
    if last is not None:
        tags = [t for t in tags if t > last]
    n = int(params["n"]) if "n" in params else len(tags)
    page, more = tags[:n], len(tags) > n
    doc["tags"] = page
    body = json.dumps(doc).encode()
    return Relayed(relayed.status, body, "application/json", None), (
        page[-1] if more and page else None)
