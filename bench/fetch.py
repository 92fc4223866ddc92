"""Fast HTTP/1.1 body fetcher for the benchmark (stdlib only, one process, epoll).

Usage::

    python bench/fetch.py [--hash first|all|none] [--timeout S] [--header 'K: V'] URL [URL ...]

Every URL given is one client: one connection, one ``GET``, ``Connection: close``; all of them
start at once. Bodies are received with ``recv_into`` a 4 MiB buffer and thrown away (on this
machine that reaches ~3 GB/s from nginx on one stream, where curl stops near 2 GB/s), or fed to
sha256 (``--hash all``, or ``--hash first``: the first transfer of each distinct URL only).

Prints one JSON document on stdout: ``{"wall": s, "bytes": n, "transfers": [...]}`` where each
transfer has ``url``, ``status``, ``bytes`` (body bytes received), ``length`` (Content-Length),
``start``/``end`` (seconds since the run began; ``end`` is the last body byte), ``connect``
(seconds the TCP connect took: ~1 s or more means a SYN was dropped, e.g. a full backlog),
``sha256`` (hex or null) and ``error`` (null when the body arrived complete, status 200/206).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import selectors
import socket
import sys
import time
from typing import Any
from urllib.parse import urlsplit

BUF = 4 << 20
USER_AGENT = "mirrorcache-bench"


class Transfer:
    """One connection fetching one URL."""

    def __init__(self, url: str, headers: list[str], want_hash: bool, t0: float) -> None:
        parts = urlsplit(url)
        self.url = url
        self.addr = (parts.hostname or "127.0.0.1", parts.port or 80)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        lines = [f"GET {path} HTTP/1.1", f"Host: {parts.netloc}", f"User-Agent: {USER_AGENT}",
                 "Accept: */*", "Connection: close", *headers]
        self.request = ("\r\n".join(lines) + "\r\n\r\n").encode()
        self.sent = 0
        self.head = bytearray()
        self.status = 0
        self.length: int | None = None
        self.received = 0
        self.hash = hashlib.sha256() if want_hash else None
        self.t0 = t0
        self.start = time.monotonic() - t0
        self.connected: float | None = None
        self.end: float | None = None
        self.error: str | None = None
        self.done = False
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        err = self.sock.connect_ex(self.addr)
        if err not in (0, 115):  # EINPROGRESS
            self.fail(f"connect: errno {err}")

    def fail(self, why: str) -> None:
        if not self.done:
            self.error = why
            self.finish()

    def finish(self) -> None:
        self.done = True
        self.end = time.monotonic() - self.t0
        self.sock.close()

    def on_writable(self) -> bool:
        """Send the request; True when it is all sent."""
        if self.connected is None:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.fail(f"connect: errno {err}")
                return False
            self.connected = time.monotonic() - self.t0
        try:
            self.sent += self.sock.send(self.request[self.sent:])
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            self.fail(f"send: {exc}")
            return False
        return self.sent >= len(self.request)

    def on_readable(self, buf: bytearray, view: memoryview) -> None:
        while not self.done:
            try:
                n = self.sock.recv_into(view)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.fail(f"recv: {exc}")
                return
            if n == 0:
                self._eof()
                return
            if self.status == 0:
                self._header_bytes(bytes(view[:n]))
            else:
                self._body(view[:n])
            if self.length is not None and self.received >= self.length and self.status:
                self._complete()
                return
            if n < len(buf):
                return

    def _header_bytes(self, data: bytes) -> None:
        self.head += data
        idx = self.head.find(b"\r\n\r\n")
        if idx < 0:
            if len(self.head) > 65536:
                self.fail("header too long")
            return
        head = bytes(self.head[:idx]).decode("latin-1").split("\r\n")
        rest = bytes(self.head[idx + 4:])
        self.head = bytearray()
        try:
            self.status = int(head[0].split(" ", 2)[1])
        except (IndexError, ValueError):
            self.fail(f"bad status line {head[0]!r}")
            return
        for line in head[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                self.length = int(value.strip())
            elif name == "transfer-encoding" and "chunked" in value.lower():
                self.fail("chunked bodies are not supported by this client")
                return
        if rest:
            self._body(memoryview(rest))

    def _body(self, chunk: memoryview) -> None:
        self.received += len(chunk)
        if self.hash is not None:
            self.hash.update(chunk)

    def _eof(self) -> None:
        if self.status == 0:
            self.fail("connection closed before the response")
        elif self.length is not None and self.received < self.length:
            self.fail(f"short body: {self.received} of {self.length}")
        else:
            self._complete()

    def _complete(self) -> None:
        if self.status not in (200, 206):
            self.error = f"HTTP {self.status}"
        elif self.length is not None and self.received != self.length:
            self.error = f"body {self.received} != Content-Length {self.length}"
        self.finish()

    def result(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "status": self.status,
            "bytes": self.received,
            "length": self.length,
            "start": round(self.start, 6),
            "connect": round(self.connected - self.start, 6) if self.connected else None,
            "end": round(self.end, 6) if self.end is not None else None,
            "sha256": self.hash.hexdigest() if self.hash is not None and not self.error else None,
            "error": self.error,
        }


def fetch(urls: list[str], *, hash_mode: str = "none", timeout: float = 300.0,
          headers: list[str] | None = None) -> dict[str, Any]:
    """Fetch every URL concurrently; see the module docstring for the result."""
    buf = bytearray(BUF)
    view = memoryview(buf)
    sel = selectors.DefaultSelector()
    t0 = time.monotonic()
    seen: set[str] = set()
    transfers: list[Transfer] = []
    for url in urls:
        want = hash_mode == "all" or (hash_mode == "first" and url not in seen)
        seen.add(url)
        t = Transfer(url, headers or [], want, t0)
        transfers.append(t)
        if not t.done:
            sel.register(t.sock, selectors.EVENT_WRITE, t)
    deadline = t0 + timeout
    active = sum(1 for t in transfers if not t.done)
    while active:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        for key, events in sel.select(min(left, 1.0)):
            t = key.data
            if events & selectors.EVENT_WRITE and t.sent < len(t.request):
                if t.on_writable():
                    sel.modify(t.sock, selectors.EVENT_READ, t)
                elif t.done:
                    sel.unregister(t.sock)
                    active -= 1
                continue
            if events & selectors.EVENT_READ:
                t.on_readable(buf, view)
                if t.done:
                    sel.unregister(t.sock)
                    active -= 1
    for t in transfers:
        if not t.done:
            with contextlib.suppress(KeyError, ValueError):
                sel.unregister(t.sock)
            t.fail(f"timeout after {timeout}s")
    sel.close()
    ends = [t.end for t in transfers if t.end is not None]
    return {
        "wall": round(max(ends) if ends else 0.0, 6),
        "bytes": sum(t.received for t in transfers),
        "transfers": [t.result() for t in transfers],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("urls", nargs="+", metavar="URL")
    parser.add_argument("--hash", choices=("none", "first", "all"), default="none",
                        help="sha256 of received bodies (default: none)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds for everything")
    parser.add_argument("--header", action="append", default=[], help="extra request header")
    args = parser.parse_args(argv)
    out = fetch(args.urls, hash_mode=args.hash, timeout=args.timeout, headers=args.header)
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
