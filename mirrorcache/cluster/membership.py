"""Who the members of the cluster are, and which of them are healthy.

Members are this replica plus the static ``cluster.peers`` (re-read from the config file on
SIGHUP), or the addresses a ``dns`` name resolves to (re-resolved every ``dns_interval``).
Each peer is probed (``GET /healthz``) every ``probe_interval``; a peer whose probe or
request fails is left out of ownership until a probe succeeds again. A peer not probed yet
counts as healthy, so replicas starting together agree on owners at once.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import aiohttp
import structlog

from mirrorcache.cluster import hrw
from mirrorcache.config import ClusterConfig, ConfigError, load_config, parse_listen
from mirrorcache.metrics import Metrics

log = structlog.get_logger("mirrorcache.cluster")
#: The most of a /healthz answer a probe reads (only its status matters).
PROBE_BODY_MAX = 4096


@dataclass
class PeerHealth:
    healthy: bool = True
    checked_at: float | None = None
    error: str | None = None


class Membership:
    """The member list, the health of each peer, and who owns a key."""

    def __init__(self, cfg: ClusterConfig, session: aiohttp.ClientSession,
                 metrics: Metrics | None = None, scheme: str = "http",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.self_address = cfg.self_address
        self.scheme = scheme
        self._session = session
        self._metrics = metrics
        self._clock = clock
        self._peers: set[str] = set(cfg.peers)
        self._health: dict[str, PeerHealth] = {}
        self._changed = asyncio.Event()

    def check_self(self) -> None:
        """A static list that does not name this replica as the others do makes it its own
        peer under another name: every replica would disagree on owners."""
        if self.cfg.dns is None and self._peers and self.self_address not in self._peers:
            log.warning("cluster.self_not_in_peers", member=self.self_address,
                        peers=sorted(self._peers),
                        hint="set cluster.self to this replica's entry in cluster.peers")

    # -- the member list
    def configured(self) -> list[str]:
        """Every member, healthy or not, this replica included."""
        return sorted(self._peers | {self.self_address})

    def healthy(self, member: str) -> bool:
        if member == self.self_address:
            return True
        return self._health.get(member, PeerHealth()).healthy

    def members(self) -> list[str]:
        """The members that own keys: this replica and every healthy peer."""
        return [m for m in self.configured() if self.healthy(m)]

    def owner(self, key: str) -> str:
        return hrw.owner(key, self.members()) or self.self_address

    def is_self(self, member: str) -> bool:
        return member == self.self_address

    def set_peers(self, peers: Iterable[str], why: str) -> None:
        new = set(peers)
        if new == self._peers:
            return
        added, removed = sorted(new - self._peers), sorted(self._peers - new)
        self._peers = new
        for gone in removed:
            self._health.pop(gone, None)
        log.info("cluster.members_changed", why=why, added=added, removed=removed,
                 members=self.configured())
        self._update_gauge()
        self._changed.set()

    def reload(self) -> None:
        """SIGHUP: re-read ``cluster.peers`` from the config file (static lists only)."""
        if self.cfg.dns is not None or self.cfg.config_file is None:
            return
        try:
            cfg = load_config(self.cfg.config_file)
        except ConfigError as exc:
            log.error("cluster.reload_failed", problems=exc.problems[:5])
            return
        self.set_peers(cfg.cluster.peers, "sighup")

    # -- health
    def mark_down(self, member: str, error: str) -> None:
        """A request to ``member`` failed: leave it out of ownership until a probe works."""
        self._set_health(member, False, error)

    def _set_health(self, member: str, healthy: bool, error: str | None) -> None:
        if member == self.self_address or member not in self._peers:
            return
        h = self._health.setdefault(member, PeerHealth())
        was = h.healthy
        h.healthy, h.error, h.checked_at = healthy, error, self._clock()
        if was != healthy:
            if healthy:
                log.info("cluster.member_up", member=member)
            else:
                log.warning("cluster.member_down", member=member, error=error)
            self._update_gauge()

    def _update_gauge(self) -> None:
        if self._metrics is None:
            return
        members = self.configured()
        up = sum(1 for m in members if self.healthy(m))
        self._metrics.cluster_members.labels("healthy").set(up)
        self._metrics.cluster_members.labels("unhealthy").set(len(members) - up)

    async def probe(self, member: str) -> tuple[bool, str | None]:
        timeout = aiohttp.ClientTimeout(total=max(self.cfg.probe_interval, 1.0))
        try:
            async with self._session.get(f"{self.scheme}://{member}/healthz", timeout=timeout,
                                         ssl=False) as resp:
                # The body is not used: at most a little is read (the connection is not
                # kept for reuse if more is left), never a peer's whole answer.
                await resp.content.read(PROBE_BODY_MAX)
                if resp.status == 200:
                    return True, None
                return False, f"healthz answered {resp.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return False, type(exc).__name__

    async def probe_all(self) -> None:
        peers = [m for m in self.configured() if m != self.self_address]
        results = await asyncio.gather(*(self.probe(m) for m in peers))
        for member, (ok, error) in zip(peers, results, strict=True):
            self._set_health(member, ok, error)

    async def resolve(self) -> None:
        """``dns``: the members are the addresses its name resolves to."""
        assert self.cfg.dns is not None
        host, port = parse_listen(self.cfg.dns)
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            log.warning("cluster.dns_failed", name=self.cfg.dns, error=str(exc))
            return
        addrs = {f"[{i[4][0]}]:{port}" if ":" in str(i[4][0]) else f"{i[4][0]}:{port}"
                 for i in infos}
        self.set_peers(addrs, "dns")

    async def run(self) -> None:
        """Resolve (dns) and probe, forever."""
        self.check_self()
        self._update_gauge()
        next_dns = 0.0
        while True:
            if self.cfg.dns is not None and self._clock() >= next_dns:
                await self.resolve()
                next_dns = self._clock() + self.cfg.dns_interval
            await self.probe_all()
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), self.cfg.probe_interval)
            except TimeoutError:
                pass

    def status(self) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        for m in self.configured():
            h = self._health.get(m)
            out.append({"member": m, "self": m == self.self_address,
                        "healthy": self.healthy(m),
                        "probed": h is not None and h.checked_at is not None,
                        "error": h.error if h else None})
        return out
