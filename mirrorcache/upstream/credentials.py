"""Where an upstream's Basic credentials come from: a small role the client asks.

A static username/password is one source; ECR's ``GetAuthorizationToken`` (upstream/ecr.py)
is another. The client sends ``await source.basic()`` where upstream asks for Basic auth (and
to bearer token realms); on a 401 to a header it sent, it asks once more with
``refused_since`` and retries once if the source refreshed.
"""

from __future__ import annotations

import base64
from typing import Protocol


class CredentialSource(Protocol):
    """Basic credentials for one upstream."""

    #: Whether asking again after a refusal can yield different credentials.
    refreshable: bool

    async def basic(self, *, refused_since: float | None = None) -> str | None:
        """The ``Authorization: Basic ...`` value to send, or None for none.

        ``refused_since`` (a ``time.monotonic()`` value): upstream refused a header the caller
        obtained after this moment; a refreshable source fetches new credentials unless it
        already did so since then (one refresh for any number of concurrent refusals).
        """


def basic_auth_header(username: str, password: str | None) -> str:
    """An ``Authorization: Basic`` value (RFC 7617, UTF-8)."""
    raw = f"{username}:{password or ''}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


class StaticCredentials:
    """A fixed username and password from the config."""

    refreshable = False

    def __init__(self, username: str, password: str | None) -> None:
        self._header = basic_auth_header(username, password)

    async def basic(self, *, refused_since: float | None = None) -> str | None:
        return self._header
