"""The real process: kill -9 mid-pull and restart, graceful SIGTERM, verify."""

from __future__ import annotations

import asyncio
import hashlib
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.support.countingproxy import CountingProxy, Fault
from tests.support.images import make_image, push_image
from tests.support.mirror import mirror_config
from tests.support.mirrorproc import MirrorProcess
from tests.support.registry import RegistryProcess
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration


def blob_files(cache: Path) -> dict[str, Path]:
    return {f"sha256:{p.name}": p for p in (cache / "blobs" / "sha256").glob("*/*")}


def run_verify(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mirrorcache", "verify", "--config",
                           str(config), *extra], capture_output=True, text=True, timeout=60)


async def fetch(http: aiohttp.ClientSession, url: str) -> bytes | None:
    try:
        async with http.get(url) as resp:
            return await resp.read()
    except (aiohttp.ClientError, ConnectionError):
        return None


async def test_kill9_mid_pull_then_restart(tmp_path: Path, registry: RegistryProcess,
                                           unique_repo: str) -> None:
    img = make_image([2_000_000] * 4 + [30_000] * 4, media="oci", raw=True)
    await push_image(registry.url, unique_repo, img, "v1")
    layers = {b.digest: b.data for b in img.layers}
    cache = tmp_path / "cache"
    async with CountingProxy(registry.url, chunk_size=65536) as proxy:
        # Big layers trickle in, so the kill lands mid-stream with partial files on disk.
        proxy.add_fault(Fault.slow(0.05, kind="blob", method="GET", times=None))
        raw = mirror_config(tmp_path, {"docker.io": {"url": proxy.url}})
        m = MirrorProcess(raw, tmp_path / "proc", workers=2)
        await m.start()
        try:
            async with aiohttp.ClientSession() as http:
                urls = [f"{m.url}/v2/{unique_repo}/blobs/{d}" for d in layers] * 3
                pulls = [asyncio.ensure_future(fetch(http, u)) for u in urls[:20]]
                await wait_until(lambda: list((cache / "tmp").glob("*.part"))
                                 and blob_files(cache), timeout=30,
                                 what="a partial and a committed blob on disk")
                m.kill_all()
                results = await asyncio.gather(*pulls)
        finally:
            m.kill_all()
        assert list((cache / "tmp").glob("*.part")), "the kill should leave partial files"
        # What is visible as committed is complete and correct; partial data is only in tmp/.
        for digest, path in blob_files(cache).items():
            assert "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest() == digest
        # No client got a complete-looking body with wrong bytes.
        for body in results:
            if body is not None and len(body) in {len(d) for d in layers.values()}:
                assert "sha256:" + hashlib.sha256(body).hexdigest() in layers

        proxy.faults.clear()
        await m.start()
        try:
            assert list((cache / "tmp").glob("*.part")) == []  # cleaned at start-up
            async with aiohttp.ClientSession() as http:
                for digest, data in layers.items():
                    body = await fetch(http, f"{m.url}/v2/{unique_repo}/blobs/{digest}")
                    assert body == data
        finally:
            await m.stop()
    done = run_verify(m.config_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"checked {len(layers)} blobs" in done.stdout and "0 corrupt" in done.stdout


async def test_verify_reports_and_repairs_corruption(tmp_path: Path, registry: RegistryProcess,
                                                     unique_repo: str) -> None:
    img = make_image([100_000, 5000], media="oci", raw=True)
    await push_image(registry.url, unique_repo, img, "v1")
    raw = mirror_config(tmp_path, {"docker.io": {"url": registry.url}})
    async with MirrorProcess(raw, tmp_path / "proc") as m, aiohttp.ClientSession() as http:
        for layer in img.layers:
            assert await fetch(http, f"{m.url}/v2/{unique_repo}/blobs/{layer.digest}") == \
                layer.data
    victim = blob_files(tmp_path / "cache")[img.layers[0].digest]
    victim.write_bytes(b"bit rot" + victim.read_bytes()[7:])
    report = run_verify(m.config_path)
    assert report.returncode == 1
    assert f"corrupt {img.layers[0].digest}" in report.stdout
    repaired = run_verify(m.config_path, "--repair")
    assert repaired.returncode == 0 and f"removed {img.layers[0].digest}" in repaired.stdout
    assert not victim.exists()
    assert run_verify(m.config_path).returncode == 0


async def test_sigterm_lets_inflight_pull_finish(tmp_path: Path, registry: RegistryProcess,
                                                 unique_repo: str) -> None:
    img = make_image([1_500_000], media="oci", raw=True)
    await push_image(registry.url, unique_repo, img, "v1")
    layer = img.layers[0]
    async with CountingProxy(registry.url, chunk_size=65536) as proxy:
        proxy.add_fault(Fault.slow(0.03, kind="blob", method="GET"))  # ~0.7 s of body
        raw = mirror_config(tmp_path, {"docker.io": {"url": proxy.url}}, shutdown_grace="20s")
        async with MirrorProcess(raw, tmp_path / "proc") as m, aiohttp.ClientSession() as http:
            pull = asyncio.ensure_future(fetch(http, f"{m.url}/v2/{unique_repo}/blobs/"
                                                     f"{layer.digest}"))
            await wait_until(lambda: m.events("blob.fetch_started"), timeout=30,
                             what="blob.fetch_started")
            m.signal(signal.SIGTERM)
            body = await pull
            assert body == layer.data
            assert await m.wait(30) == 0
            # Stopped accepting: a new connection is refused.
            assert await fetch(http, f"{m.url}/v2/") is None


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


async def test_supervisor_restarts_a_dead_worker_and_survives_sighup(
        tmp_path: Path, registry: RegistryProcess, unique_repo: str) -> None:
    import os

    img = make_image([50_000], media="oci", raw=True)
    await push_image(registry.url, unique_repo, img, "v1")
    layer = img.layers[0]
    raw = mirror_config(tmp_path, {"docker.io": {"url": registry.url}})
    async with MirrorProcess(raw, tmp_path / "proc", workers=2) as m:
        assert m.proc is not None
        workers = [e["pid"] for e in m.events("server.worker_started")]
        assert len(workers) == 2 and all(p in _children(m.proc.pid) for p in workers)
        os.kill(workers[0], signal.SIGKILL)
        await wait_until(lambda: len(m.events("app.started")) >= 3, timeout=30,
                         what="the replacement worker's app.started")
        assert m.events("server.worker_died")
        m.signal(signal.SIGHUP)  # reload request: forwarded, nobody dies
        async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True)) as http:
            for _ in range(6):
                assert await fetch(http, f"{m.url}/v2/{unique_repo}/blobs/{layer.digest}") \
                    == layer.data
        assert len(m.events("server.worker_died")) == 1
        assert m.proc.poll() is None
