"""The set of upstream clients the proxy may call, by canonical upstream name."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import aiohttp

from mirrorcache.errors import ErrorCode, OCIError, error_from_upstream
from mirrorcache.upstream.body import MAX_ERROR_BODY, read_capped
from mirrorcache.upstream.client import UpstreamClient

#: Longest wait for an error body; a non-blob error body is already within request_timeout.
ERROR_BODY_TIMEOUT = 10.0


class Upstreams:
    """Lookup of configured upstreams; an unknown name is a routing bug, not a request."""

    def __init__(self, clients: Mapping[str, UpstreamClient]) -> None:
        self._clients = dict(clients)

    def __getitem__(self, name: str) -> UpstreamClient:
        return self._clients[name]


async def relay_error(resp: aiohttp.ClientResponse, default_code: ErrorCode) -> OCIError:
    """Turn an upstream error response into an OCIError (reads at most ``MAX_ERROR_BODY``
    bytes, for at most ``ERROR_BODY_TIMEOUT``; a body that does not come is no body)."""
    try:
        async with asyncio.timeout(ERROR_BODY_TIMEOUT):
            body = await read_capped(resp, MAX_ERROR_BODY, "error body", truncate=True)
    except (aiohttp.ClientError, TimeoutError):
        body = b""
    err = error_from_upstream(resp.status, body, default_code)
    if resp.status in (502, 504):
        # A gateway in front of the upstream could not reach it (retries are spent): the
        # upstream is unavailable, as with 503. A 500 stays our 502: it is about the request.
        err = OCIError(ErrorCode.UNAVAILABLE, err.message, status=503)
    retry_after = resp.headers.get("Retry-After")
    if retry_after and resp.status in (429, 503):
        err.headers["Retry-After"] = retry_after
    return err
