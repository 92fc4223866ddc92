"""Closed-loop HTTP/1.1 keep-alive load for a fixed time (GET or HEAD), like wrk.

Usage::

    python bench/loadgen.py URL [--method HEAD] [-c 32] [-d 10] [--header 'K: V'] [--procs 1]

``-c`` connections each send a request, wait for the whole response, and send the next, until
``-d`` seconds are up; requests still in flight then are not counted. It exists because wrk
4.1 (Debian) cannot do HEAD: its parser waits for the body that a HEAD response announces in
Content-Length but never sends. uvloop is used when installed; ``--procs N`` splits the
connections over N processes. Prints one JSON document: ``requests``, ``seconds``, ``rps``,
``statuses`` (count per status code), ``errors`` (connection errors), ``latency_ms``
(p50/p99/max).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import sys
import time
from typing import Any
from urllib.parse import urlsplit

USER_AGENT = "mirrorcache-bench"


class _Conn(asyncio.Protocol):
    def __init__(self, request: bytes, head: bool, deadline: float, stats: dict[str, Any],
                 done: asyncio.Future[None]) -> None:
        self.request = request
        self.head = head
        self.deadline = deadline
        self.stats = stats
        self.done = done
        self.buf = bytearray()
        self.need: int | None = None  # total bytes of the current response, once known
        self.status = 0
        self.sent_at = 0.0
        self.transport: Any = None  # uvloop's transports are not asyncio.Transport subclasses

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self._send()

    def _send(self) -> None:
        assert self.transport is not None
        self.sent_at = time.monotonic()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            if self.need is None:
                idx = self.buf.find(b"\r\n\r\n")
                if idx < 0:
                    return
                head = bytes(self.buf[:idx]).decode("latin-1")
                lines = head.split("\r\n")
                self.status = int(lines[0].split(" ", 2)[1])
                length = 0
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                self.need = idx + 4 + (0 if self.head else length)
            if len(self.buf) < self.need:
                return
            del self.buf[:self.need]
            self.need = None
            now = time.monotonic()
            if now > self.deadline:
                self._close()
                return
            st = self.stats
            st["requests"] += 1
            st["statuses"][self.status] = st["statuses"].get(self.status, 0) + 1
            st["latencies"].append(now - self.sent_at)
            self._send()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.need is not None or self.buf:
            self.stats["errors"] += 1  # cut in the middle of a response
        if not self.done.done():
            self.done.set_result(None)


async def _client(host: str, port: int, request: bytes, head: bool, deadline: float,
                  stats: dict[str, Any]) -> None:
    """One connection's worth of load; reconnects when the server closes (keepalive limits)."""
    loop = asyncio.get_running_loop()
    while time.monotonic() < deadline:
        done: asyncio.Future[None] = loop.create_future()
        try:
            await loop.create_connection(
                lambda d=done: _Conn(request, head, deadline, stats, d),  # type: ignore[misc]
                host, port)
        except OSError:
            stats["errors"] += 1
            await asyncio.sleep(0.01)
            continue
        stats["connections"] += 1
        await done


async def _run(url: str, method: str, conns: int, duration: float,
               headers: list[str]) -> dict[str, Any]:
    parts = urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    lines = [f"{method} {path} HTTP/1.1", f"Host: {parts.netloc}", f"User-Agent: {USER_AGENT}",
             *headers]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode()
    stats: dict[str, Any] = {"requests": 0, "statuses": {}, "latencies": [], "errors": 0,
                             "connections": 0}
    deadline = time.monotonic() + duration
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    clients = [_client(host, port, request, method == "HEAD", deadline, stats)
               for _ in range(conns)]
    await asyncio.wait_for(asyncio.gather(*clients), timeout=duration + 30)
    stats["seconds"] = duration
    return stats


def _worker(args: tuple[str, str, int, float, list[str]]) -> dict[str, Any]:
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(_run(*args))


def run(url: str, *, method: str = "GET", conns: int = 32, duration: float = 10.0,
        headers: list[str] | None = None, procs: int = 1) -> dict[str, Any]:
    """Run the load and return the summary (see the module docstring)."""
    headers = headers or []
    shares = [conns // procs + (1 if i < conns % procs else 0) for i in range(procs)]
    jobs = [(url, method, n, duration, headers) for n in shares if n]
    if len(jobs) == 1:
        parts = [_worker(jobs[0])]
    else:
        with multiprocessing.get_context("fork").Pool(len(jobs)) as pool:
            parts = pool.map(_worker, jobs)
    lat = sorted(x for p in parts for x in p["latencies"])
    statuses: dict[str, int] = {}
    for p in parts:
        for code, n in p["statuses"].items():
            statuses[str(code)] = statuses.get(str(code), 0) + n
    requests = sum(p["requests"] for p in parts)

    def pct(q: float) -> float:
        return round(lat[min(int(q * len(lat)), len(lat) - 1)] * 1000, 3) if lat else 0.0

    return {
        "method": method,
        "connections": conns,
        "requests": requests,
        "seconds": duration,
        "rps": round(requests / duration, 1),
        "statuses": statuses,
        "errors": sum(p["errors"] for p in parts),
        "connects": sum(p["connections"] for p in parts),
        "latency_ms": {"p50": pct(0.5), "p99": pct(0.99), "max": pct(1.0)},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url")
    parser.add_argument("--method", default="GET", choices=("GET", "HEAD"))
    parser.add_argument("-c", "--connections", type=int, default=32)
    parser.add_argument("-d", "--duration", type=float, default=10.0, help="seconds")
    parser.add_argument("--header", action="append", default=[])
    parser.add_argument("--procs", type=int, default=1)
    args = parser.parse_args(argv)
    out = run(args.url, method=args.method, conns=args.connections, duration=args.duration,
              headers=args.header, procs=args.procs)
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
