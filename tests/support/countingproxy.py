"""A counting, fault-injecting HTTP reverse proxy for registry traffic in tests.

Put :class:`CountingProxy` in front of an upstream registry (``async with
CountingProxy(registry.url) as p``) and point the system under test at ``p.url``. Every
request is recorded on arrival as a :class:`Seen` (``p.requests``); ``p.count("GET", "blob")``
counts by method / kind / repo. Requests and responses are streamed in chunks, never
buffered whole. ``Location`` headers pointing at the upstream are rewritten to the proxy so
that uploads and redirects keep flowing through it.

Fault injection: append :class:`Fault` objects to ``p.faults``. Faults are checked in order,
the first matching one with uses left is applied (and used up), and the request is still
recorded. Actions: ``Fault.status`` (answer directly), ``Fault.hang`` (sleep, then forward),
``Fault.hold`` (wait for a test's event, then forward),
``Fault.drop_after`` (forward but cut the connection after n body bytes), ``Fault.corrupt``
(forward with a byte flipped, same length).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

Kind = Literal["base", "catalog", "blob", "upload", "manifest", "tags", "referrers", "other"]
Action = Literal["status", "hang", "drop_after", "corrupt", "slow", "hold", "pause_after"]

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)

_ROUTES: list[tuple[re.Pattern[str], Kind]] = [
    (re.compile(r"^/v2/?$"), "base"),
    (re.compile(r"^/v2/_catalog$"), "catalog"),
    (re.compile(r"^/v2/(?P<repo>.+)/blobs/uploads(?:/(?P<ref>[^/]*))?$"), "upload"),
    (re.compile(r"^/v2/(?P<repo>.+)/blobs/(?P<ref>[^/]+)$"), "blob"),
    (re.compile(r"^/v2/(?P<repo>.+)/manifests/(?P<ref>[^/]+)$"), "manifest"),
    (re.compile(r"^/v2/(?P<repo>.+)/tags/list$"), "tags"),
    (re.compile(r"^/v2/(?P<repo>.+)/referrers/(?P<ref>[^/]+)$"), "referrers"),
]


def classify(path: str) -> tuple[Kind, str | None, str | None]:
    """Map a registry API path to ``(kind, repo, reference)``.

    ``/v2/`` is "base", ``/v2/r/blobs/uploads/..`` is "upload" (not "blob"), unknown is "other".
    """
    for pattern, kind in _ROUTES:
        m = pattern.match(path)
        if m:
            groups = m.groupdict()
            return kind, groups.get("repo"), groups.get("ref") or None
    return "other", None, None


@dataclass(frozen=True)
class Seen:
    """One request as it arrived at the proxy."""

    method: str
    path: str
    query: str
    headers: CIMultiDictProxy[str]
    time: float = field(default=0.0, compare=False)
    fault: Action | None = None

    @property
    def kind(self) -> Kind:
        return classify(self.path)[0]

    @property
    def repo(self) -> str | None:
        return classify(self.path)[1]

    @property
    def reference(self) -> str | None:
        """Tag/digest of a manifest, digest of a blob/referrers, upload id."""
        return classify(self.path)[2]


@dataclass
class Fault:
    """A fault matching ``method`` / ``kind`` / ``path`` substring (None = any).

    Applies ``times`` times (None = forever); :attr:`hits` counts applications.
    """

    action: Action
    method: str | None = None
    kind: Kind | None = None
    path: str | None = None
    times: int | None = 1
    code: int = 503
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    seconds: float = 0.0
    nbytes: int = 0
    offset: int = 0
    gate: asyncio.Event | None = None
    hits: int = 0
    #: Set when a ``pause_after`` fault has forwarded its bytes and starts waiting.
    paused: asyncio.Event = field(default_factory=asyncio.Event)

    @classmethod
    def status(
        cls,
        code: int,
        headers: Mapping[str, str] | None = None,
        body: bytes = b"",
        *,
        method: str | None = None,
        kind: Kind | None = None,
        path: str | None = None,
        times: int | None = 1,
    ) -> Fault:
        """Answer with ``code`` directly, without forwarding (e.g. 429 + Retry-After)."""
        return cls(
            "status", method, kind, path, times, code=code, headers=dict(headers or {}), body=body
        )

    @classmethod
    def hang(
        cls,
        seconds: float,
        *,
        method: str | None = None,
        kind: Kind | None = None,
        path: str | None = None,
        times: int | None = 1,
    ) -> Fault:
        """Sleep ``seconds`` before forwarding."""
        return cls("hang", method, kind, path, times, seconds=seconds)

    @classmethod
    def hold(
        cls,
        gate: asyncio.Event,
        *,
        method: str | None = None,
        kind: Kind | None = None,
        path: str | None = None,
        times: int | None = 1,
    ) -> Fault:
        """Hold the request until the test sets ``gate``, then forward it (no timing)."""
        return cls("hold", method, kind, path, times, gate=gate)

    @classmethod
    def drop_after(
        cls,
        nbytes: int,
        *,
        method: str | None = None,
        kind: Kind | None = None,
        path: str | None = None,
        times: int | None = 1,
    ) -> Fault:
        """Forward, but close the client connection after ``nbytes`` body bytes."""
        return cls("drop_after", method, kind, path, times, nbytes=nbytes)

    @classmethod
    def pause_after(
        cls,
        nbytes: int,
        gate: asyncio.Event,
        *,
        method: str | None = None,
        kind: Kind | None = None,
        path: str | None = None,
        times: int | None = 1,
    ) -> Fault:
        """Forward ``nbytes`` body bytes, then hold the rest until the test sets ``gate``
        (a download that is surely still in flight, without timing); :attr:`paused` is set
        once the bytes are written."""
        return cls("pause_after", method, kind, path, times, nbytes=nbytes, gate=gate)

    @classmethod
    def corrupt(
        cls,
        offset: int = 0,
        *,
        method: str | None = None,
        kind: Kind | None = None,
        path: str | None = None,
        times: int | None = 1,
    ) -> Fault:
        """Forward with the body byte at ``offset`` inverted (length unchanged)."""
        return cls("corrupt", method, kind, path, times, offset=offset)

    @classmethod
    def slow(
        cls,
        seconds_per_chunk: float,
        *,
        method: str | None = None,
        kind: Kind | None = None,
        path: str | None = None,
        times: int | None = 1,
    ) -> Fault:
        """Forward, sleeping ``seconds_per_chunk`` before each body chunk (a slow upstream)."""
        return cls("slow", method, kind, path, times, seconds=seconds_per_chunk)

    @property
    def exhausted(self) -> bool:
        return self.times is not None and self.hits >= self.times

    def matches(self, method: str, path: str) -> bool:
        return (
            not self.exhausted
            and (self.method is None or self.method.upper() == method.upper())
            and (self.kind is None or classify(path)[0] == self.kind)
            and (self.path is None or self.path in path)
        )


class CountingProxy:
    """Streaming reverse proxy to ``target_url`` on 127.0.0.1 that records every request."""

    def __init__(self, target_url: str, *, chunk_size: int = 64 * 1024) -> None:
        self.target = URL(target_url)
        self.chunk_size = chunk_size
        self.requests: list[Seen] = []
        self.faults: list[Fault] = []
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.port = 0

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``."""
        return f"127.0.0.1:{self.port}"

    # -- counting --------------------------------------------------------------------------

    def count(
        self, method: str | None = None, kind: Kind | None = None, repo: str | None = None
    ) -> int:
        """Number of recorded requests matching all given filters."""
        return len(self.matching(method, kind, repo))

    def matching(
        self, method: str | None = None, kind: Kind | None = None, repo: str | None = None
    ) -> list[Seen]:
        """Recorded requests matching all given filters."""
        return [
            s
            for s in self.requests
            if (method is None or s.method == method.upper())
            and (kind is None or s.kind == kind)
            and (repo is None or s.repo == repo)
        ]

    def reset(self) -> None:
        """Forget recorded requests (faults are kept)."""
        self.requests.clear()

    def add_fault(self, fault: Fault) -> Fault:
        """Append ``fault`` to :attr:`faults` and return it (to inspect ``hits`` later)."""
        self.faults.append(fault)
        return fault

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> CountingProxy:
        self._session = aiohttp.ClientSession(
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        )
        app = web.Application(client_max_size=1 << 40)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> CountingProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- proxying --------------------------------------------------------------------------

    def _pick_fault(self, method: str, path: str) -> Fault | None:
        for fault in self.faults:
            if fault.matches(method, path):
                fault.hits += 1
                return fault
        return None

    def _rewrite_location(self, value: str) -> str:
        loc = URL(value, encoded=True)
        if loc.is_absolute() and loc.origin() == self.target.origin():
            return str(loc.with_scheme("http").with_host("127.0.0.1").with_port(self.port))
        return value

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        fault = self._pick_fault(request.method, request.path)
        self.requests.append(
            Seen(
                request.method,
                request.path,
                request.query_string,
                request.headers,
                time.time(),
                fault.action if fault else None,
            )
        )
        if fault is not None and fault.action == "status":
            return web.Response(status=fault.code, headers=fault.headers, body=fault.body)
        if fault is not None and fault.action == "hold" and fault.gate is not None:
            await fault.gate.wait()
        if fault is not None and fault.action == "hang":
            if not await _sleep_while_connected(request, fault.seconds):
                return web.Response(status=499)  # client gave up; nothing is sent
        state: dict[str, bool] = {"prepared": False}
        try:
            return await self._forward(request, fault, state)
        except (ConnectionError, aiohttp.ClientError, TimeoutError) as exc:
            if not state["prepared"] and _connected(request):
                return web.Response(status=502, text=f"CountingProxy upstream error: {exc!r}")
            await _drop(request)  # mid-body failure (or client gone): cut the connection
            return web.Response(status=499)

    async def _forward(
        self, request: web.Request, fault: Fault | None, state: dict[str, bool]
    ) -> web.StreamResponse:
        assert self._session is not None
        headers = CIMultiDict(
            (k, v)
            for k, v in request.headers.items()
            if k.lower() not in HOP_BY_HOP and k.lower() != "host"
        )
        upstream_url = self.target.join(URL(request.raw_path, encoded=True))
        data = request.content if request.body_exists else None
        async with self._session.request(
            request.method,
            upstream_url,
            headers=headers,
            data=data,
            allow_redirects=False,
        ) as upstream:
            resp_headers = CIMultiDict(
                (k, v) for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP
            )
            if "Location" in resp_headers:
                resp_headers["Location"] = self._rewrite_location(resp_headers["Location"])
            response = web.StreamResponse(
                status=upstream.status, reason=upstream.reason, headers=resp_headers
            )
            state["prepared"] = True
            await response.prepare(request)
            if request.method == "HEAD":
                return response
            sent = 0
            async for chunk in upstream.content.iter_chunked(self.chunk_size):
                if fault is not None and fault.action == "corrupt":
                    pos = fault.offset - sent
                    if 0 <= pos < len(chunk):
                        chunk = chunk[:pos] + bytes([chunk[pos] ^ 0xFF]) + chunk[pos + 1 :]
                if fault is not None and fault.action == "drop_after":
                    if sent + len(chunk) >= fault.nbytes:
                        await response.write(chunk[: max(fault.nbytes - sent, 0)])
                        await _drop(request)
                        return response
                if (fault is not None and fault.action == "pause_after"
                        and fault.gate is not None and sent <= fault.nbytes < sent + len(chunk)):
                    head, chunk = chunk[: fault.nbytes - sent], chunk[fault.nbytes - sent :]
                    await response.write(head)
                    sent += len(head)
                    fault.paused.set()
                    await fault.gate.wait()
                if fault is not None and fault.action == "slow":
                    await asyncio.sleep(fault.seconds)
                await response.write(chunk)
                sent += len(chunk)
            await response.write_eof()
            return response


def _connected(request: web.Request) -> bool:
    transport = request.transport
    return transport is not None and not transport.is_closing()


async def _sleep_while_connected(request: web.Request, seconds: float) -> bool:
    """Sleep up to ``seconds``; return False early if the client disconnects."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while (remaining := deadline - loop.time()) > 0:
        if not _connected(request):
            return False
        await asyncio.sleep(min(0.05, remaining))
    return _connected(request)


async def _drop(request: web.Request) -> None:
    """Flush what was written and close the client's connection mid-body."""
    transport = request.transport
    if transport is not None:
        transport.close()  # close() flushes the written bytes, then closes the socket
    await asyncio.sleep(0)
