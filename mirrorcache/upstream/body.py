"""Bounded reads of upstream bodies: nothing from an upstream or realm is read into memory
without a size cap, and nothing is decompressed (requests ask for ``identity``).

Caps, one per kind of body, so a hostile upstream can hold at most this much per request:
"""

from __future__ import annotations

import aiohttp

#: A token endpoint's JSON answer.
MAX_TOKEN_RESPONSE = 64 * 1024
#: The bearer token itself, as sent in an ``Authorization`` header.
MAX_TOKEN_LENGTH = 16 * 1024
#: An upstream error body (only its first part is relayed anyway).
MAX_ERROR_BODY = 64 * 1024
#: A tag list or a referrers index.
MAX_LISTING_BYTES = 4 * 1024 * 1024


class BodyRefused(Exception):
    """A body the mirror will not take; the message says why."""


class BodyTooLarge(BodyRefused):
    """The body is (or announced to be) larger than the cap for its kind."""

    def __init__(self, what: str, limit: int) -> None:
        self.what = what
        self.limit = limit
        super().__init__(f"{what} larger than {limit} bytes")


class BodyEncoded(BodyRefused):
    """The body came content-encoded (gzip, ...) although ``identity`` was asked for."""

    def __init__(self, what: str, encoding: str) -> None:
        super().__init__(f"{what} sent with Content-Encoding {encoding[:40]!r} although "
                         "identity was asked for")


async def read_capped(resp: aiohttp.ClientResponse, limit: int, what: str, *,
                      truncate: bool = False) -> bytes:
    """The body of ``resp``, at most ``limit`` bytes, read as it arrives (no decompression:
    the raw bytes on the wire). Over the cap: ``BodyTooLarge``, or with ``truncate`` the first
    ``limit`` bytes. A content-encoded body is ``BodyEncoded`` (we never decompress, and its
    bytes are not the content). Transport errors and timeouts propagate (aiohttp's
    ``ClientError``, ``TimeoutError``)."""
    encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity") and not truncate:
        raise BodyEncoded(what, encoding)
    if not truncate and (resp.content_length or 0) > limit:
        raise BodyTooLarge(what, limit)
    chunks: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = await resp.content.read(min(limit + 1 - size, 1 << 16))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    body = b"".join(chunks)
    if size > limit:
        if truncate:
            return body[:limit]
        raise BodyTooLarge(what, limit)
    return body
