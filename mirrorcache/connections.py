"""Client connections: caps per client address and overall, and a send timeout.

Counting happens when a connection is accepted (idle connections that never send a request
count too), so a flood is refused before file descriptors run out: a connection over a cap
gets ``503 TOOMANYREQUESTS`` with ``Retry-After`` to its first request and is closed (and is
dropped after :data:`REFUSED_LINGER` seconds if it sends nothing). ``/healthz`` is exempt
(it is answered, then the connection is closed), so a liveness probe does not restart a
mirror that is merely busy; ``/readyz`` is not, so a saturated mirror leaves the rotation.

The send timeout is the kernel's ``TCP_USER_TIMEOUT`` on each accepted socket: a client
that does not read (zero window) or does not acknowledge for ``send_timeout`` has its
connection reset, whatever is being sent (sendfile, writes, buffered data at close).
"""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from typing import Any

import structlog
from aiohttp import web

from mirrorcache.errors import ErrorCode, Handler, OCIError, error_response

log = structlog.get_logger("mirrorcache.connections")

#: Seconds an over-cap connection may stay open waiting for its request.
REFUSED_LINGER = 5.0
#: Seconds a refused client is told to wait.
RETRY_AFTER = 1
#: Paths answered even on an over-cap connection (liveness probes).
EXEMPT_PATHS = frozenset({"/healthz"})


def client_key(address: str | None) -> str:
    """The address a cap applies to: IPv4 as is, IPv6 by its /64 (one host's usual share)."""
    if not address:
        return "unknown"
    if ":" not in address:
        return address
    if address.startswith("::ffff:") and "." in address:
        return address[7:]
    try:
        packed = socket.inet_pton(socket.AF_INET6, address.split("%", 1)[0])
    except OSError:
        return address
    return socket.inet_ntop(socket.AF_INET6, packed[:8] + bytes(8)) + "/64"


class ConnectionGuard:
    """Open client connections per address and overall, owned by the app (0: no cap)."""

    def __init__(self, max_connections: int, max_per_client: int, send_timeout: float) -> None:
        self.max_connections = max_connections
        self.max_per_client = max_per_client
        self.send_timeout = send_timeout
        self.total = 0
        self.per_client: Counter[str] = Counter()
        self._keys: dict[asyncio.BaseTransport, str] = {}
        self._refused: set[asyncio.BaseTransport] = set()

    def attach(self, server: web.Server) -> None:
        """Count the connections of this aiohttp server."""
        made, lost = server.connection_made, server.connection_lost

        def connection_made(handler: Any, transport: asyncio.Transport) -> None:
            made(handler, transport)
            self.opened(transport)

        def connection_lost(handler: Any, exc: BaseException | None = None) -> None:
            transport = handler.transport
            lost(handler, exc)
            if transport is not None:
                self.closed(transport)

        server.connection_made = connection_made  # type: ignore[method-assign]
        server.connection_lost = connection_lost  # type: ignore[method-assign]

    def opened(self, transport: asyncio.Transport) -> bool:
        """Count a new connection; False (and refused) if it is over a cap."""
        peer = transport.get_extra_info("peername")
        key = client_key(peer[0] if isinstance(peer, tuple) else None)
        self._keys[transport] = key
        self.total += 1
        self.per_client[key] += 1
        self._set_send_timeout(transport)
        over = ((self.max_connections and self.total > self.max_connections)
                or (self.max_per_client and self.per_client[key] > self.max_per_client))
        if over:
            self._refused.add(transport)
            log.warning("connection.refused", client=key, client_connections=self.per_client[key],
                        connections=self.total)
            asyncio.get_running_loop().call_later(REFUSED_LINGER, transport.abort)
        return not over

    def closed(self, transport: asyncio.BaseTransport) -> None:
        key = self._keys.pop(transport, None)
        if key is None:
            return
        self._refused.discard(transport)
        self.total -= 1
        self.per_client[key] -= 1
        if self.per_client[key] <= 0:
            del self.per_client[key]

    def refused(self, transport: asyncio.BaseTransport | None) -> bool:
        return transport is not None and transport in self._refused

    def _set_send_timeout(self, transport: asyncio.Transport) -> None:
        sock = transport.get_extra_info("socket")
        option = getattr(socket, "TCP_USER_TIMEOUT", None)
        if sock is None or option is None or self.send_timeout <= 0:
            return
        try:
            sock.setsockopt(socket.IPPROTO_TCP, option, int(self.send_timeout * 1000))
        except OSError:  # not TCP (a Unix socket in tests)
            pass


CONNECTIONS = web.AppKey("connections", ConnectionGuard)


@web.middleware
async def connection_limit_middleware(request: web.Request, handler: Handler
                                      ) -> web.StreamResponse:
    """Answer a request on an over-cap connection with 503 TOOMANYREQUESTS, then close."""
    guard = request.app.get(CONNECTIONS)
    if guard is None or not guard.refused(request.transport):
        return await handler(request)
    if request.path in EXEMPT_PATHS:
        resp = await handler(request)
    else:
        resp = error_response(OCIError(
            ErrorCode.TOOMANYREQUESTS, "too many connections from this address or in total; retry "
            f"in {RETRY_AFTER}s", status=503, headers={"Retry-After": str(RETRY_AFTER)}),
            head=request.method == "HEAD")
    resp.force_close()
    return resp


class GuardedAppRunner(web.AppRunner):
    """An AppRunner whose server reports connections to the app's :class:`ConnectionGuard`."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        guard = self.app.get(CONNECTIONS)
        if guard is not None:
            guard.attach(server)
        return server
