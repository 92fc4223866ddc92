"""The set of upstream clients the proxy may call, by canonical upstream name."""

from __future__ import annotations

from collections.abc import Mapping

import aiohttp

from mirrorcache.errors import ErrorCode, OCIError, error_from_upstream
from mirrorcache.upstream.client import UpstreamClient

MAX_ERROR_BODY = 16 * 1024


class Upstreams:
    """Lookup of configured upstreams; an unknown name is a routing bug, not a request."""

    def __init__(self, clients: Mapping[str, UpstreamClient]) -> None:
        self._clients = dict(clients)

    def __getitem__(self, name: str) -> UpstreamClient:
        return self._clients[name]


async def relay_error(resp: aiohttp.ClientResponse, default_code: ErrorCode) -> OCIError:
    """Turn an upstream error response into an OCIError (reads at most a small body)."""
    try:
        body = await resp.content.read(MAX_ERROR_BODY)
    except (aiohttp.ClientError, TimeoutError):
        body = b""
    err = error_from_upstream(resp.status, body, default_code)
    retry_after = resp.headers.get("Retry-After")
    if retry_after and resp.status in (429, 503):
        err.headers["Retry-After"] = retry_after
    return err
