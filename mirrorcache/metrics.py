"""Prometheus metrics, one registry per app (no module-level collectors)."""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

#: Label combinations of the per-request collectors whose children are kept at hand.
MAX_CACHED_LABELS = 1024


class Metrics:
    """The collectors mirrorcache exports on /metrics.

    With ``--workers N`` the supervisor sets PROMETHEUS_MULTIPROC_DIR (see server.py): every
    worker's values live in files there and :meth:`exposition` sums the process group, so a
    scrape of any worker sees one target.
    """

    def __init__(self) -> None:
        self.multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "mirrorcache_requests", "Client requests", ["method", "kind", "status", "cache"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "mirrorcache_request_duration_seconds", "Client request duration", ["kind"],
            registry=self.registry,
        )
        self.bytes_served = Counter(
            "mirrorcache_served_bytes", "Body bytes sent to clients", ["cache"],
            registry=self.registry,
        )
        self.upstream_requests = Counter(
            "mirrorcache_upstream_requests", "Requests sent to upstreams",
            ["upstream", "method", "status"], registry=self.registry,
        )
        self.upstream_bytes = Counter(
            "mirrorcache_upstream_bytes", "Blob bytes fetched from upstreams", ["upstream"],
            registry=self.registry,
        )
        self.coalesced = Counter(
            "mirrorcache_coalesced_requests", "Requests that joined an in-flight fetch", ["kind"],
            registry=self.registry,
        )
        self.ratelimit_remaining = Gauge(
            "mirrorcache_upstream_ratelimit_remaining", "Last ratelimit-remaining seen",
            ["upstream"], registry=self.registry, multiprocess_mode="mostrecent",
        )
        self.breaker_open = Gauge(
            "mirrorcache_upstream_breaker_open", "1 while an upstream's circuit is open",
            ["upstream"], registry=self.registry, multiprocess_mode="livemax",
        )
        self.policy_denied = Counter(
            "mirrorcache_policy_denied", "Requests refused by policy", ["upstream"],
            registry=self.registry,
        )
        self.cache_bytes = Gauge(
            "mirrorcache_cache_bytes", "Bytes of committed content in the cache (as of the "
            "last sweep)", ["backend"], registry=self.registry, multiprocess_mode="mostrecent",
        )
        self.cache_limit = Gauge(
            "mirrorcache_cache_limit_bytes", "storage.max_size (0: no limit)",
            registry=self.registry, multiprocess_mode="mostrecent",
        )
        self.evicted_bytes = Counter(
            "mirrorcache_evicted_bytes", "Bytes evicted from the cache", ["reason"],
            registry=self.registry,
        )
        self.evicted_images = Counter(
            "mirrorcache_evicted_images", "Images (or loose blobs) evicted from the cache",
            registry=self.registry,
        )
        self.peer_requests = Counter(
            "mirrorcache_peer_requests", "Requests to the owning replica, by result (ok, "
            "refused, unreachable, timeout, error)", ["kind", "result"], registry=self.registry,
        )
        self.peer_fallbacks = Counter(
            "mirrorcache_peer_fallbacks", "Fetches done upstream because the owning replica "
            "was unreachable, slow to answer or broke mid-stream", ["kind"],
            registry=self.registry,
        )
        self.peer_served = Counter(
            "mirrorcache_peer_served", "Peer requests this replica answered as owner",
            ["kind", "status"], registry=self.registry,
        )
        self.cluster_members = Gauge(
            "mirrorcache_cluster_members", "Members seen, by health", ["health"],
            registry=self.registry, multiprocess_mode="mostrecent",
        )

        # The children of the three per-request collectors, by label values: labels() takes a
        # lock and builds its key on every call, a dict lookup does not.
        self._request_children: dict[tuple[str, str, int, str], tuple[Any, Any, Any]] = {}

    def request_finished(self, method: str, kind: str, status: int, cache: str,
                         seconds: float, sent: int) -> None:
        """Count a client request: requests, request_seconds and bytes_served."""
        key = (method, kind, status, cache)
        children = self._request_children.get(key)
        if children is None:
            children = (self.requests.labels(method, kind, str(status), cache),
                        self.request_seconds.labels(kind), self.bytes_served.labels(cache))
            if len(self._request_children) < MAX_CACHED_LABELS:
                self._request_children[key] = children
        counted, timed, served = children
        counted.inc()
        timed.observe(seconds)
        served.inc(sent)

    def exposition(self) -> bytes:
        """The text a scrape gets: this process's registry, or the whole process group."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        group = CollectorRegistry()
        MultiProcessCollector(group, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
        return generate_latest(group)
