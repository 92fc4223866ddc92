"""/metrics with --workers N reports the whole process group (prometheus_client multiprocess
mode, PROMETHEUS_MULTIPROC_DIR set by the supervisor): any worker's scrape sees every
worker's counts."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from tests.support.mirror import mirror_config
from tests.support.mirrorproc import MirrorProcess

pytestmark = pytest.mark.integration


def base_requests(text: str) -> float:
    return sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
               if line.startswith("mirrorcache_requests_total{") and 'kind="base"' in line)


async def test_metrics_aggregate_all_workers(tmp_path: Path) -> None:
    raw = mirror_config(tmp_path, {"docker.io": {"url": "http://127.0.0.1:9"}})
    n = 60
    async with MirrorProcess(raw, tmp_path / "m", workers=2) as m:
        # A new connection per request, so the kernel spreads them over both workers.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)
                                         ) as http:
            async def ping() -> int:
                async with http.get(f"{m.url}/v2/") as resp:
                    await resp.read()
                    return resp.status

            assert await asyncio.gather(*(ping() for _ in range(n))) == [200] * n
            served_by = {e.get("worker") for e in m.events("request.finished")
                         if e.get("path") == "/v2/"}
            assert served_by == {0, 1}  # both workers answered some
            for _ in range(6):  # whichever worker answers the scrape
                async with http.get(f"{m.url}/metrics") as resp:
                    assert resp.status == 200
                    assert base_requests(await resp.text()) == n
