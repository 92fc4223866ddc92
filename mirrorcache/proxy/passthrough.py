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
from mirrorcache.upstream.body import MAX_LISTING_BYTES, BodyRefused, read_capped
from mirrorcache.upstream.client import UpstreamUnavailable


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
                body = await read_capped(resp, MAX_LISTING_BYTES, "upstream listing")
            except BodyRefused as exc:
                raise OCIError(ErrorCode.UNKNOWN, f"upstream {exc}", status=502) from None
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise UpstreamUnavailable(target.upstream, type(exc).__name__) from None
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
