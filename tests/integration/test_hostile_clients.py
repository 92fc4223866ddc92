"""Hostile clients: login floods, connection floods, clients that stop reading or vanish.

Each test runs a real mirror in front of a real Distribution registry (through a counting
proxy) and asserts statuses, OCI error codes, bytes and how many requests reached upstream.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt
import pytest
from structlog.testing import capture_logs

from mirrorcache.auth import authenticator as authenticator_module
from mirrorcache.connections import CONNECTIONS
from tests.support.countingproxy import CountingProxy, Fault
from tests.support.images import Image, make_image, push_image
from tests.support.mirror import Mirror, mirror_config
from tests.support.registry import RegistryProcess
from tests.support.secure import write_htpasswd
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

ALICE = ("alice", "alice-pw-1")


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def auth_config(tmp_path: Path, upstream: str, cost: int = 4, **auth: Any) -> dict[str, Any]:
    htpasswd = write_htpasswd(tmp_path / "htpasswd", dict([ALICE]))
    if cost != 4:  # a real cost, so that a flood keeps the bcrypt threads busy for a while
        hashed = bcrypt.hashpw(ALICE[1].encode(), bcrypt.gensalt(cost)).decode()
        htpasswd.write_text(f"{ALICE[0]}:{hashed}\n")
    return mirror_config(tmp_path, {"docker.io": {"url": upstream}},
                         auth={"enabled": True, "htpasswd": str(htpasswd), **auth},
                         policy={"rules": [{"allow": "docker.io/**", "users": ["alice"]}]})


@pytest.fixture
async def hub(registry: RegistryProcess) -> AsyncIterator[CountingProxy]:
    async with CountingProxy(registry.url) as proxy:
        yield proxy


async def push(registry: RegistryProcess, layers: list[int]) -> tuple[str, Image]:
    repo = f"library/{uuid.uuid4().hex[:10]}"
    img = make_image(layers, media="oci")
    await push_image(registry.url, repo, img, "v1")
    return repo, img


def count_bcrypt(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the thread of every bcrypt check."""
    threads: list[str] = []
    real = authenticator_module._checkpw

    def counting(password: bytes, hashed: bytes) -> bool:
        threads.append(threading.current_thread().name)
        return real(password, hashed)

    monkeypatch.setattr(authenticator_module, "_checkpw", counting)
    return threads


async def test_concurrent_wrong_passwords_hit_the_limit(
        tmp_path: Path, registry: RegistryProcess, hub: CountingProxy,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """100 concurrent wrong passwords, max_failed_logins 10: at most 10 are checked, the
    rest are refused with 429 TOOMANYREQUESTS before any bcrypt."""
    checks = count_bcrypt(monkeypatch)
    repo, _ = await push(registry, [1000])
    hub.reset()
    async with Mirror(auth_config(tmp_path, hub.url, max_failed_logins=10)) as m:
        url = f"{m.url}/v2/{repo}/manifests/v1"
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:

            async def attempt(i: int) -> tuple[int, str | None, str | None]:
                async with http.get(url, headers=basic("alice", f"wrong-{i}")) as resp:
                    body = await resp.json()
                    return resp.status, body["errors"][0]["code"], resp.headers.get(
                        "Retry-After")

            results = await asyncio.gather(*(attempt(i) for i in range(100)))
            # The right password is refused too now (the address is over its budget).
            async with http.get(url, headers=basic(*ALICE)) as resp:
                assert resp.status == 429
    statuses = [r[0] for r in results]
    assert statuses.count(401) == 10 and statuses.count(429) == 90
    assert {r[1] for r in results if r[0] == 429} == {"TOOMANYREQUESTS"}
    assert {r[1] for r in results if r[0] == 401} == {"UNAUTHORIZED"}
    assert all(r[2] is not None and int(r[2]) >= 1 for r in results if r[0] == 429)
    assert len(checks) == 10
    assert hub.requests == []


async def test_login_flood_stays_out_of_the_default_executor(
        tmp_path: Path, registry: RegistryProcess, hub: CountingProxy,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """While 60 wrong-password requests are in flight, an authorised cold pull completes;
    every bcrypt check ran in the two bcrypt threads, none in asyncio's default pool."""
    checks = count_bcrypt(monkeypatch)
    repo, img = await push(registry, [300_000])
    hub.reset()
    async with Mirror(auth_config(tmp_path, hub.url, cost=9, max_failed_logins=0)) as m:
        base = f"{m.url}/v2/{repo}"
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            # Alice's password is verified (and remembered) before the flood starts.
            async with http.get(f"{m.url}/v2/", headers=basic(*ALICE)) as resp:
                assert resp.status == 200

            async def wrong(i: int) -> int:
                async with http.get(f"{base}/manifests/v1",
                                    headers=basic("mallory", f"x{i}")) as resp:
                    return resp.status

            flood = [asyncio.create_task(wrong(i)) for i in range(60)]
            start = time.monotonic()
            async with http.get(f"{base}/manifests/v1", headers=basic(*ALICE)) as resp:
                assert resp.status == 200
                assert await resp.read() == img.manifest
            layer = img.layers[0]
            async with http.get(f"{base}/blobs/{layer.digest}", headers=basic(*ALICE)) as resp:
                assert resp.status == 200
                assert await resp.read() == layer.data
            pull = time.monotonic() - start
            in_flight = sum(not t.done() for t in flood)
            assert set(await asyncio.gather(*flood)) == {401}
    assert in_flight > 0, "the flood was over before the pull: the test proves nothing"
    assert len(checks) == 61
    assert {name.rsplit("_", 1)[0] for name in checks} == {"mirrorcache-bcrypt"}
    assert pull < 5.0
    assert hub.count(kind="blob") == 1


def small_socket() -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    sock.setblocking(False)
    return sock


async def read_some_then_close(port: int, path: str, want: int,
                               before_reading: Awaitable[object] | None = None) -> None:
    """GET ``path`` and vanish after ``want`` bytes of the response (small socket buffers,
    so the server cannot have sent everything into them by then); ``before_reading`` is
    awaited between sending the request and reading the answer."""
    sock = small_socket()
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=16384)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    if before_reading is not None:
        await before_reading
    got = 0
    while got < want:
        chunk = await reader.read(65536)
        assert chunk, "server closed first"
        got += len(chunk)
    writer.transport.abort()  # RST: the server's next send fails


#: How the client vanishes: from a cached blob (a written lead, then sendfile); from a blob in
#: flight while its response waits for upstream bytes (upstream holds the body after 2 MiB);
#: from a blob in flight while its response is in a sendfile (upstream holds the body after
#: 40 MiB, and the client reads only once that much was sent: far more than socket buffers).
DISCONNECTS = {"cached": None, "inflight": 2 << 20, "inflight-sending": 40 << 20}


@pytest.mark.parametrize("case", DISCONNECTS)
async def test_client_disconnect_is_one_event_with_the_bytes_sent(
        tmp_path: Path, registry: RegistryProcess, hub: CountingProxy, case: str) -> None:
    """A client that vanishes mid-blob: one ``request.client_disconnected`` event, no
    traceback and no ``request.unhandled_error``; ``request.finished`` has 0 < bytes < size.

    The mirror runs as in production (``server.py``): aiohttp does not cancel the handler
    of a client that went away (aiohttp's test default does; a response waiting for upstream
    bytes then ended in a bare CancelledError: 499, no event)."""
    size = 48 << 20
    repo, img = await push(registry, [size])
    layer = img.layers[0]
    hub.reset()
    raw = mirror_config(tmp_path, {"docker.io": {"url": hub.url}})
    async with Mirror(raw, handler_cancellation=False) as m:
        port = int(m.host.rsplit(":", 1)[1])
        path = f"/v2/{repo}/blobs/{layer.digest}"
        async with aiohttp.ClientSession() as http:
            if case == "cached":
                async with http.get(m.url + path) as resp:
                    assert resp.status == 200 and await resp.read() == layer.data
        gate = asyncio.Event()
        held = DISCONNECTS[case]
        fault = None if held is None else hub.add_fault(
            Fault.pause_after(held, gate, method="GET", kind="blob"))
        before = fault.paused.wait() if fault is not None and case == "inflight-sending" else None
        with capture_logs() as logs:
            await read_some_then_close(port, path, 1 << 20, before)
            # The server sees the connection go (the download is still held upstream), and
            # only then is the rest of the body let through.
            await wait_until(lambda: m.app[CONNECTIONS].total == 0, what="connection closed")
            gate.set()
            await wait_until(lambda: any(e["event"] == "request.finished" for e in logs),
                             what="request.finished")
        async with aiohttp.ClientSession() as http:  # the mirror is fine afterwards
            async with http.get(m.url + path) as resp:
                assert resp.status == 200 and await resp.read() == layer.data
    finished = [e for e in logs if e["event"] == "request.finished"]
    assert len(finished) == 1
    assert finished[0]["error"] == "client_disconnected" and finished[0]["status"] == 200
    assert 0 < finished[0]["bytes"] < len(layer.data)
    if held is not None:
        assert finished[0]["bytes"] <= held and finished[0]["cache"] == "miss"
    gone = [e for e in logs if e["event"] == "request.client_disconnected"]
    assert len(gone) == 1 and "exc_info" not in gone[0]
    assert not [e for e in logs if e["event"] in ("request.unhandled_error",
                                                  "http.protocol_error")]
    assert not [e for e in logs if e.get("exc_info")]
    assert hub.count(kind="blob") == 1


async def send_request(port: int, path: str, *, close: bool = False
                       ) -> tuple[int, dict[str, str], bytes]:
    """One request (keep-alive unless ``close``); the whole answer, read until the server
    closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    extra = "Connection: close\r\n" if close else ""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())
    data = await asyncio.wait_for(reader.read(), 10)  # a refused connection is closed
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return int(lines[0].split(" ")[1]), headers, body


async def test_connections_over_the_per_client_cap_get_503(
        tmp_path: Path, registry: RegistryProcess, hub: CountingProxy) -> None:
    """With max_connections_per_client 20: 20 idle connections are held, the 21st
    connection's request gets 503 TOOMANYREQUESTS (JSON, Retry-After) and is closed;
    /healthz is still answered on such a connection; closing idle ones frees the cap."""
    repo, img = await push(registry, [1000])
    hub.reset()
    raw = mirror_config(tmp_path, {"docker.io": {"url": hub.url}},
                        limits={"max_connections_per_client": 20, "max_connections": 100})
    async with Mirror(raw) as m:
        port = int(m.host.rsplit(":", 1)[1])
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(20)]
        with capture_logs() as logs:
            status, headers, body = await send_request(port, f"/v2/{repo}/manifests/v1")
            assert status == 503
            assert json.loads(body)["errors"][0]["code"] == "TOOMANYREQUESTS"
            assert int(headers["retry-after"]) >= 1 and headers["connection"] == "close"
            status, _, body = await send_request(port, "/healthz")
            assert status == 200 and json.loads(body) == {"status": "ok"}
            status, _, _ = await send_request(port, "/readyz")
            assert status == 503
        assert [e["event"] for e in logs].count("connection.refused") == 3
        assert hub.requests == []
        for _, writer in idle[:5]:
            writer.close()
        deadline = time.monotonic() + 5
        while m.app[CONNECTIONS].per_client["127.0.0.1"] > 15:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        status, _, body = await send_request(port, f"/v2/{repo}/manifests/v1", close=True)
        assert status == 200 and body == img.manifest
        for _, writer in idle[5:]:
            writer.close()
    assert hub.count(kind="manifest") >= 1  # only the admitted request went upstream


async def test_client_that_stops_reading_is_cut_after_send_timeout(
        tmp_path: Path, registry: RegistryProcess, hub: CountingProxy) -> None:
    """A client asks for a big cached blob and never reads: its connection is reset within
    the send timeout (plus the kernel's probe granularity), the server's slot is freed."""
    repo, img = await push(registry, [24 << 20])
    layer = img.layers[0]
    raw = mirror_config(tmp_path, {"docker.io": {"url": hub.url}},
                        limits={"send_timeout": "1s"})
    async with Mirror(raw) as m:
        port = int(m.host.rsplit(":", 1)[1])
        path = f"/v2/{repo}/blobs/{layer.digest}"
        async with aiohttp.ClientSession() as http:
            async with http.get(m.url + path) as resp:
                assert resp.status == 200 and await resp.read() == layer.data
        guard = m.app[CONNECTIONS]
        sock = small_socket()
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        with capture_logs() as logs:
            await asyncio.get_running_loop().sock_sendall(
                sock, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            start = time.monotonic()
            while guard.total > 0:  # the server lets go of the connection
                assert time.monotonic() - start < 10, "connection still open"
                await asyncio.sleep(0.05)
            cut = time.monotonic() - start
            while not any(e["event"] == "request.finished" for e in logs):
                assert time.monotonic() - start < 10, logs
                await asyncio.sleep(0.05)
        sock.close()
    assert cut < 5.0
    finished = [e for e in logs if e["event"] == "request.finished"]
    assert len(finished) == 1 and finished[0]["error"] == "client_disconnected"
    assert 0 < finished[0]["bytes"] < len(layer.data)
    assert hub.count(kind="blob") == 1
