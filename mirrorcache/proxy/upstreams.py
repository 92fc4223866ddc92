"""The set of upstream registries the proxy may call, by canonical upstream name."""

from __future__ import annotations

from collections.abc import Mapping

from mirrorcache.upstream.registry import RegistryClient


class Upstreams:
    """Lookup of configured upstreams; an unknown name is a routing bug, not a request."""

    def __init__(self, clients: Mapping[str, RegistryClient]) -> None:
        self._clients = dict(clients)

    def __getitem__(self, name: str) -> RegistryClient:
        return self._clients[name]
