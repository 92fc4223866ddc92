"""Endpoints relayed to upstream as they are: tag listing and referrers."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp

from mirrorcache.config import UpstreamConfig
from mirrorcache.errors import ErrorCode, OCIError
from mirrorcache.proxy.routing import Target
from mirrorcache.proxy.upstreams import Upstreams, relay_error
from mirrorcache.upstream.client import UpstreamUnavailable

MAX_LISTING_BYTES = 8 * 1024 * 1024


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

    async def relay(self, target: Target, suffix: str, params: Mapping[str, str],
                    default_code: ErrorCode) -> Relayed:
        if self._configs[target.upstream].offline:
            raise OCIError(ErrorCode.UNAVAILABLE,
                           f"upstream {target.upstream} is offline", status=503)
        client = self._upstreams[target.upstream]
        path = f"/v2/{target.repository}/{suffix}"
        async with client.open("GET", path, target.repository, {"Accept": "application/json, "
                               "application/vnd.oci.image.index.v1+json"}, params) as resp:
            if resp.status != 200:
                raise await relay_error(resp, default_code)
            try:
                body = await resp.content.read(MAX_LISTING_BYTES + 1)
                while not resp.content.at_eof() and len(body) <= MAX_LISTING_BYTES:
                    more = await resp.content.read(MAX_LISTING_BYTES + 1 - len(body))
                    if not more:
                        break
                    body += more
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise UpstreamUnavailable(target.upstream, type(exc).__name__) from None
            if len(body) > MAX_LISTING_BYTES:
                raise OCIError(ErrorCode.UNKNOWN, "upstream listing too large", status=502)
            return Relayed(
                status=200,
                body=body,
                content_type=resp.headers.get("Content-Type", "application/json"),
                link=resp.headers.get("Link"),
            )


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
