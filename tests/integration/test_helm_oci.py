"""Charts are registry content too: ``helm push`` a chart to a real Distribution upstream,
``helm pull oci://<mirror>/<upstream>/<repo>`` through mirrorcache, same bytes and digest.

A Helm chart is an OCI artifact whose config and layer media types are not image types
(``application/vnd.cncf.helm.config.v1+json``, ``...chart.content.v1.tar+gzip``); the mirror
caches them like any other content: a second pull reaches upstream for no blob.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import subprocess
from pathlib import Path

import aiohttp
import pytest

from tests.support.countingproxy import CountingProxy
from tests.support.kube import CHART, helm_binary
from tests.support.mirror import Mirror, mirror_config
from tests.support.registry import RegistryProcess

pytestmark = pytest.mark.integration

HELM_CONFIG = "application/vnd.cncf.helm.config.v1+json"
HELM_LAYER = "application/vnd.cncf.helm.chart.content.v1.tar+gzip"


async def run_helm(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """helm in a thread, so the in-process mirror on this event loop keeps serving."""
    binary = helm_binary()
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but helm is not installed")
        pytest.skip("helm not installed (.ci/run installs it)")
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(HELM_REGISTRY_CONFIG=str(tmp / "registry.json"), HELM_CACHE_HOME=str(tmp / "c"),
               HELM_CONFIG_HOME=str(tmp / "cfg"), HELM_DATA_HOME=str(tmp / "d"))
    proc = await asyncio.to_thread(subprocess.run, [binary, *args], capture_output=True,
                                   text=True, timeout=120, env=env, cwd=tmp)
    assert proc.returncode == 0, proc.stderr
    return proc


async def test_helm_chart_push_then_pull_through_mirror(
        registry: RegistryProcess, tmp_path: Path, unique_repo: str) -> None:
    package = await run_helm(tmp_path, "package", str(CHART), "-d", str(tmp_path / "pkg"))
    packaged = Path(package.stdout.strip().rsplit(": ", 1)[1])
    chart_bytes = await asyncio.to_thread(packaged.read_bytes)
    repo = f"{unique_repo}/charts"
    pushed = await run_helm(tmp_path, "push", str(packaged), f"oci://{registry.host}/{repo}",
                      "--plain-http")
    digest = re.search(r"Digest: (sha256:[0-9a-f]{64})", pushed.stdout + pushed.stderr)
    assert digest, pushed.stdout + pushed.stderr

    async with CountingProxy(registry.url) as upstream:
        raw = mirror_config(tmp_path, {"charts.example.com": {"url": upstream.url}},
                            default=None)
        async with Mirror(raw) as mirror:
            ref = f"oci://{mirror.host}/charts.example.com/{repo}/mirrorcache"
            for attempt in ("cold", "warm"):
                dest = tmp_path / attempt
                dest.mkdir()
                pulled = await run_helm(tmp_path, "pull", ref, "--version", "0.1.0", "--plain-http",
                                  "-d", str(dest))
                out = pulled.stdout + pulled.stderr
                assert f"Digest: {digest.group(1)}" in out, out
                (tgz,) = dest.glob("*.tgz")
                assert await asyncio.to_thread(tgz.read_bytes) == chart_bytes
                if attempt == "cold":
                    blobs = upstream.count("GET", "blob")
                    assert blobs == 2  # the config and the chart layer, once each
            assert upstream.count("GET", "blob") == blobs  # warm: no blob from upstream

            # The artifact's non-image media types are served as they were pushed.
            async with aiohttp.ClientSession() as http:
                url = f"{mirror.url}/v2/charts.example.com/{repo}/mirrorcache/manifests/0.1.0"
                async with http.get(url, headers={"Accept": "application/vnd.oci.image."
                                                  "manifest.v1+json"}) as resp:
                    body = await resp.read()
                    assert resp.status == 200
                    assert resp.headers["Docker-Content-Digest"] == digest.group(1)
                    assert "sha256:" + hashlib.sha256(body).hexdigest() == digest.group(1)
                manifest = json.loads(body)
                assert manifest["config"]["mediaType"] == HELM_CONFIG
                assert [layer["mediaType"] for layer in manifest["layers"]] == [HELM_LAYER]
                layer = manifest["layers"][0]
                async with http.get(f"{mirror.url}/v2/charts.example.com/{repo}/mirrorcache/"
                                    f"blobs/{layer['digest']}") as resp:
                    assert resp.status == 200
                    assert await resp.read() == chart_bytes
