"""Docker Hub's quirks in one place: its names, the ``library/`` namespace, its rate limit.

Pure functions over strings and header mappings (no HTTP here), used by config validation,
routing and the upstream client.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

#: Docker Hub's canonical upstream name.
DOCKER_HUB = "docker.io"
#: Other host names clients use for Docker Hub; they all mean ``docker.io``.
DOCKER_HUB_ALIASES = ("registry-1.docker.io", "index.docker.io", "registry.hub.docker.com")


def is_docker_hub(upstream: str) -> bool:
    """Whether this upstream name is Docker Hub."""
    return upstream == DOCKER_HUB


def canonical_host(host: str) -> str:
    """The registry host, lower-cased, with Docker Hub's aliases folded into ``docker.io``."""
    host = host.lower()
    return DOCKER_HUB if host in DOCKER_HUB_ALIASES else host


def canonical_repository(upstream: str, repository: str) -> str:
    """Docker Hub's official images live under ``library/``: ``alpine`` is ``library/alpine``."""
    if is_docker_hub(upstream) and "/" not in repository:
        return f"library/{repository}"
    return repository


@dataclass(frozen=True, slots=True)
class RateLimit:
    """Docker Hub's ``ratelimit-limit`` / ``ratelimit-remaining`` headers, as sent and parsed.

    ``limit`` and ``remaining`` are the raw header values (``"100;w=21600"``); ``remaining_count``
    is the number before the first ``;``, or None when it is not a number.
    """

    limit: str
    remaining: str
    remaining_count: float | None


def parse_ratelimit(headers: Mapping[str, str]) -> RateLimit | None:
    """The rate limit a response reports, or None when it carries no ``ratelimit-remaining``."""
    remaining = headers.get("ratelimit-remaining")
    if remaining is None:
        return None
    try:
        count: float | None = float(remaining.split(";", 1)[0])
    except ValueError:
        count = None
    return RateLimit(headers.get("ratelimit-limit", ""), remaining, count)
