"""Mapping the three client forms (bare, ``?ns=``, host prefix) to one (upstream, repository)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from mirrorcache.errors import ErrorCode, OCIError
from mirrorcache.oci.reference import validate_name
from mirrorcache.upstream.dockerhub import canonical_host, canonical_repository

_HOST_RE = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)"
                      r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*(?::[0-9]{1,5})?")

#: Resolved names a Router remembers (all forgotten at once when full).
RESOLVED_MEMO = 4096

#: How the request named its upstream: none (``default_upstream``), ``?ns=``, or a host prefix.
RouteForm = Literal["default", "ns", "prefix"]


@dataclass(frozen=True, slots=True)
class Target:
    """A canonical repository at a configured upstream: the cache key of everything we store.

    ``form`` records how the client addressed it (for logs); it is not part of the identity,
    so the three forms share one cache key.
    """

    upstream: str
    repository: str
    form: RouteForm = field(default="default", compare=False)

    def __str__(self) -> str:
        return f"{self.upstream}/{self.repository}"


def looks_like_host(component: str) -> bool:
    """The rule Docker uses: a first component with a dot or colon, or 'localhost', is a host."""
    return "." in component or ":" in component or component == "localhost"


class Router:
    """Resolves request names against the configured upstreams only (no open proxy)."""

    def __init__(self, upstreams: Mapping[str, object], default: str | None) -> None:
        self._upstreams = frozenset(upstreams)
        self._default = default
        # Names resolve the same way every time: the busy ones are remembered (bounded).
        self._resolved: dict[tuple[str, str | None], Target] = {}

    def _known(self, host: str, how: str) -> str:
        if len(host) > 255 or not _HOST_RE.fullmatch(host):
            raise OCIError(ErrorCode.NAME_INVALID, f"invalid registry host in {how}: {host[:80]!r}")
        canonical = canonical_host(host)
        if canonical not in self._upstreams:
            raise OCIError(ErrorCode.NAME_UNKNOWN,
                           f"upstream registry {canonical!r} is not configured "
                           "on this mirror", status=404)
        return canonical

    def resolve(self, name: str, ns: str | None = None) -> Target:
        """Resolve the name from the URL path (and containerd's ``ns``) to a Target."""
        target = self._resolved.get((name, ns))
        if target is None:
            target = self._resolve(name, ns)
            if len(self._resolved) >= RESOLVED_MEMO:
                self._resolved.clear()
            self._resolved[(name, ns)] = target
        return target

    def _resolve(self, name: str, ns: str | None) -> Target:
        form: RouteForm
        if ns is not None:
            upstream = self._known(ns, "ns")
            repository, form = name, "ns"
        else:
            first, sep, rest = name.partition("/")
            if sep and looks_like_host(first):
                upstream = self._known(first, "path")
                repository, form = rest, "prefix"
            elif self._default is not None:
                upstream, repository, form = self._default, name, "default"
            else:
                raise OCIError(ErrorCode.NAME_UNKNOWN,
                               "no upstream named in the path or ns, and no "
                               "default_upstream configured", status=404)
        validate_name(repository)
        return Target(upstream, canonical_repository(upstream, repository), form)
