"""The container image, built from the Dockerfile and run under a private dockerd.

It runs read-only as a non-root user with host networking on a loopback port, a mounted
config, the cache on a named volume and /tmp on tmpfs; skopeo pulls through it from a real
Distribution upstream; ``docker stop`` ends it with status 0 well within the grace period.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.support.countingproxy import CountingProxy
from tests.support.dockerd import Dockerd
from tests.support.images import make_image, push_image
from tests.support.ports import free_port
from tests.support.registry import RegistryProcess
from tests.support.skopeo import copied_blob_digests, manifest_digest, skopeo_copy

# The first test builds the image (debootstrap on a cold cache, then docker build).
pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

STOP_GRACE = 20


async def wait_ready(url: str, container: str, dockerd: Dockerd, timeout: float = 60) -> None:
    """Poll ``url`` until it answers 200; fail with the container's log if it never does."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            try:
                async with http.get(url, ssl=False) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            state = dockerd.docker("inspect", "-f", "{{.State.Running}}", container).stdout
            if state.strip() != "true":
                break
            await _pause()
    logs = dockerd.docker("logs", "--tail", "40", container, check=False)
    pytest.fail(f"{url} never became ready:\n{logs.stdout}\n{logs.stderr}")


async def _pause() -> None:
    import asyncio

    await asyncio.sleep(0.2)


def inspect(dockerd: Dockerd, container: str) -> dict[str, Any]:
    data: list[dict[str, Any]] = json.loads(dockerd.docker("inspect", container).stdout)
    return data[0]


async def test_image_pulls_through_read_only_non_root_and_stops_cleanly(
        dockerd: Dockerd, mirrorcache_image: str, registry: RegistryProcess,
        unique_repo: str, tmp_path: Path) -> None:
    img = make_image([300_000, 40_000], media="oci")
    await push_image(registry.url, unique_repo, img, "v1")
    port = free_port()
    async with CountingProxy(registry.url) as upstream:
        config = tmp_path / "mirrorcache.yaml"
        config.write_text(yaml.safe_dump({
            "listen": f"127.0.0.1:{port}",
            "storage": {"filesystem": {"path": "/var/lib/mirrorcache"}},
            "upstreams": {"upstream.test": {"url": upstream.url}},
            "default_upstream": "upstream.test",
            "log": {"format": "json"},
            "shutdown_grace": "10s",
        }))
        config.chmod(0o644)
        name = f"mc-{uuid.uuid4().hex[:8]}"
        volume = f"{name}-cache"
        dockerd.docker(
            "run", "-d", "--name", name, "--network", "host", "--read-only",
            "--tmpfs", "/tmp", "--user", "10001:10001", "--stop-timeout", str(STOP_GRACE),
            "--health-interval", "1s", "--health-start-period", "0s",
            "-e", f"MIRRORCACHE_HEALTH_URL=http://127.0.0.1:{port}/healthz",
            "-v", f"{volume}:/var/lib/mirrorcache",
            "-v", f"{config}:/etc/mirrorcache/mirrorcache.yaml:ro",
            mirrorcache_image)
        try:
            await wait_ready(f"http://127.0.0.1:{port}/readyz", name, dockerd)

            copy = await skopeo_copy(f"127.0.0.1:{port}/upstream.test/{unique_repo}:v1",
                                     tmp_path / "pulled")
            assert manifest_digest(copy.dest_dir) == img.digest
            assert copied_blob_digests(copy.dest_dir) == img.blob_digests
            assert upstream.count("GET", "blob") == len(img.blob_digests)
            # A second pull is served from the container's cache volume.
            again = await skopeo_copy(f"127.0.0.1:{port}/upstream.test/{unique_repo}:v1",
                                      tmp_path / "again")
            assert copied_blob_digests(again.dest_dir) == img.blob_digests
            assert upstream.count("GET", "blob") == len(img.blob_digests)

            uid = dockerd.docker("exec", name, "id", "-u").stdout.strip()
            assert uid == "10001"
            ro = dockerd.docker("exec", name, "touch", "/opt/x", check=False)
            assert ro.returncode != 0 and "Read-only file system" in ro.stderr
            pid1 = dockerd.docker("exec", name, "cat", "/proc/1/cmdline").stdout
            assert pid1.split("\0")[0].endswith("tini")

            # HEALTHCHECK runs /healthz inside the container.
            deadline = time.monotonic() + 30
            while inspect(dockerd, name)["State"]["Health"]["Status"] != "healthy":
                assert time.monotonic() < deadline, inspect(dockerd, name)["State"]["Health"]
                await _pause()

            start = time.monotonic()
            dockerd.docker("stop", name, timeout=STOP_GRACE + 30)
            elapsed = time.monotonic() - start
            state = inspect(dockerd, name)["State"]
            assert state["ExitCode"] == 0, dockerd.docker("logs", name).stderr[-2000:]
            assert not state["OOMKilled"]
            assert elapsed < STOP_GRACE, f"docker stop took {elapsed:.1f}s (SIGKILL?)"
            logs = dockerd.docker("logs", name)
            events = [json.loads(line) for line in (logs.stdout + logs.stderr).splitlines()
                      if line.startswith("{")]
            assert "request.finished" in {e.get("event") for e in events}
        finally:
            dockerd.docker("rm", "-f", name, check=False)
            dockerd.docker("volume", "rm", "-f", volume, check=False)


def test_image_labels_user_and_size(dockerd: Dockerd, mirrorcache_image: str) -> None:
    cfg = inspect(dockerd, mirrorcache_image)["Config"]
    labels = cfg["Labels"]
    assert labels["org.opencontainers.image.title"] == "mirrorcache"
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert labels["org.opencontainers.image.base.name"] == "mirrorcache-base:bookworm"
    assert cfg["User"] == "10001:10001"
    assert cfg["Entrypoint"] == ["tini", "--", "mirrorcache"]
    assert "/healthz" in " ".join(cfg["Healthcheck"]["Test"])
    size = int(inspect(dockerd, mirrorcache_image)["Size"])
    print(f"\nimage size: {size / 1e6:.0f} MB")
    assert size < 250e6
    # Everything the image bakes in is valid, and the venv has no pip to tamper with.
    run = dockerd.docker("run", "--rm", "--network", "none", "--read-only",
                         mirrorcache_image, "check-config", "/etc/mirrorcache/mirrorcache.yaml")
    assert run.stdout.startswith("ok: 4 upstreams")
    no_pip = dockerd.docker("run", "--rm", "--network", "none", "--entrypoint", "python",
                            mirrorcache_image, "-c", "import pip", check=False)
    assert no_pip.returncode == 1 and "No module named 'pip'" in no_pip.stderr
