"""Hostile clients: login floods, connection floods, clients that stop reading or vanish.

Each test runs a real mirror in front of a real Distribution registry (through a counting
proxy) and asserts statuses, OCI error codes, bytes and how many requests reached upstream.
"""

from __future__ import annotations

import asyncio
import base64
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt
import pytest

from mirrorcache.auth import authenticator as authenticator_module
from tests.support.countingproxy import CountingProxy
from tests.support.images import Image, make_image, push_image
from tests.support.mirror import Mirror, mirror_config
from tests.support.registry import RegistryProcess
from tests.support.secure import write_htpasswd

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
