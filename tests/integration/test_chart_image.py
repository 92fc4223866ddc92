"""What the chart renders, run in the built image: the closest to "installed" without a cluster.

The Deployment's args, env, volume mounts, user and securityContext (auth from an htpasswd
Secret, TLS from a Secret, the policy ConfigMap, upstream credentials from Secrets) are
materialised as a kubelet would and given to ``docker run`` under the private dockerd;
skopeo pulls through it over TLS with the digests pushed upstream, the policy is enforced
and reloaded when its ConfigMap file changes, and ``docker stop`` ends it with status 0.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import aiohttp
import pytest
import yaml

from tests.integration.test_image import inspect, wait_ready
from tests.support.countingproxy import CountingProxy
from tests.support.dockerd import Dockerd
from tests.support.images import make_image, push_image
from tests.support.kube import CHART, find, helm_binary, helm_template, materialise
from tests.support.ports import free_port
from tests.support.registry import RegistryProcess
from tests.support.secure import TestCA, write_htpasswd
from tests.support.skopeo import SkopeoError, copied_blob_digests, manifest_digest, skopeo_copy

# The first test builds the image (debootstrap on a cold cache, then docker build).
pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


async def test_rendered_deployment_runs_in_image(
        dockerd: Dockerd, mirrorcache_image: str, registry: RegistryProcess,
        unique_repo: str, tmp_path: Path) -> None:
    if helm_binary() is None:
        pytest.skip("helm not installed")
    public = make_image([200_000, 30_000], media="oci", seed=1)
    private = make_image([150_000], media="docker", seed=2)
    await push_image(registry.url, f"library/{unique_repo.replace('/', '-')}", public, "v1")
    await push_image(registry.url, f"acme/{unique_repo}", private, "v1")
    lib_repo = f"library/{unique_repo.replace('/', '-')}"
    port = free_port()
    ca = TestCA(tmp_path / "ca")
    secrets: dict[str, dict[str, str | bytes]] = {
        "hub-credentials": {"token": "hub-secret-token"},
        "ghcr-credentials": {"password": "ghcr-secret"},
        "mirror-users": {"htpasswd": write_htpasswd(tmp_path / "htpasswd",
                                                    {"alice": "wonderland"}).read_text()},
        "mirror-tls": {"tls.crt": ca.cert.read_bytes(), "tls.key": ca.key.read_bytes()},
    }
    async with CountingProxy(registry.url) as upstream:
        manifests = helm_template([CHART / "ci" / "auth-tls-policy-values.yaml"], {
            "config.port": port,
            # The pod's 0.0.0.0 would be every host interface under --network host.
            "config.extra.listen": f"127.0.0.1:{port}",
            "config.upstreams.docker\\.io.url": upstream.url,
            "config.upstreams.ghcr\\.io.url": upstream.url,
            "policy.reloadInterval": "200ms",
        })
        pod = materialise(manifests, tmp_path / "pod", secrets)
        cfg = yaml.safe_load(find(manifests, "ConfigMap", "mc-mirrorcache")["data"]
                             ["mirrorcache.yaml"])
        assert cfg["listen"] == f"127.0.0.1:{port}"
        name = f"mc-chart-{uuid.uuid4().hex[:8]}"
        volume = f"{name}-cache"
        dockerd.docker("run", "-d", "--name", name, "--network", "host",
                       "-e", f"MIRRORCACHE_HEALTH_URL=https://127.0.0.1:{port}/healthz",
                       *pod.docker_args(volume), mirrorcache_image, *pod.args)
        try:
            await wait_ready(f"https://127.0.0.1:{port}/readyz", name, dockerd)
            mirror = f"127.0.0.1:{port}"
            tls = ["--src-cert-dir", str(ca.cert_dir)]
            # Anonymous pull of docker.io/library/* (policy: anonymous allowed), TLS verified.
            copy = await skopeo_copy(f"{mirror}/docker.io/{lib_repo}:v1", tmp_path / "pub",
                                     tls_verify=True, extra=tls)
            assert manifest_digest(copy.dest_dir) == public.digest
            assert copied_blob_digests(copy.dest_dir) == public.blob_digests
            # ghcr.io/acme/** only for group ci: alice (from the htpasswd Secret) may ...
            copy = await skopeo_copy(f"{mirror}/ghcr.io/acme/{unique_repo}:v1",
                                     tmp_path / "priv", tls_verify=True, extra=tls,
                                     creds=("alice", "wonderland"))
            assert manifest_digest(copy.dest_dir) == private.digest
            # ... anonymous may not, and nothing more reaches upstream for it.
            before = len(upstream.requests)
            with pytest.raises(SkopeoError):
                await skopeo_copy(f"{mirror}/ghcr.io/acme/{unique_repo}:v1", tmp_path / "anon",
                                  tls_verify=True, extra=tls)
            assert len(upstream.requests) == before
            assert upstream.count("GET", "blob") == len(public.blob_digests | private.blob_digests)

            # The policy ConfigMap changes (kubelet swaps the file): reloaded, no restart.
            policy_dir, _ = pod.mounts["/etc/mirrorcache/policy"]
            new = policy_dir / ".policy.yaml.new"
            new.write_text(yaml.safe_dump({"default": "deny", "rules": []}))
            new.chmod(0o644)
            new.rename(policy_dir / "policy.yaml")
            url = f"https://{mirror}/v2/docker.io/{lib_repo}/manifests/v1"
            deadline = time.monotonic() + 30
            async with aiohttp.ClientSession() as http:
                while True:
                    async with http.get(url, ssl=False) as resp:
                        if resp.status in (401, 403):
                            body = await resp.json()
                            break
                    assert time.monotonic() < deadline, "policy change never took effect"
                    await asyncio.sleep(0.1)
            assert body["errors"][0]["code"] in ("DENIED", "UNAUTHORIZED")
            assert inspect(dockerd, name)["RestartCount"] == 0

            start = time.monotonic()
            dockerd.docker("stop", "-t", "20", name, timeout=60)
            assert time.monotonic() - start < 20
            assert inspect(dockerd, name)["State"]["ExitCode"] == 0
            logs = dockerd.docker("logs", name)
            text = logs.stdout + logs.stderr
            for secret in ("hub-secret-token", "ghcr-secret", "wonderland"):
                assert secret not in text
            assert "policy.reloaded" in text
        finally:
            dockerd.docker("rm", "-f", name, check=False)
            dockerd.docker("volume", "rm", "-f", volume, check=False)


async def test_node_config_daemonset_runs_in_image(
        dockerd: Dockerd, mirrorcache_image: str, tmp_path: Path) -> None:
    """The DaemonSet's container (its command, user, read-only root, no capabilities) writes
    hosts.toml into the directory mounted where the node's certs.d would be."""
    if helm_binary() is None:
        pytest.skip("helm not installed")
    manifests = helm_template([CHART / "ci" / "nodeconfig-values.yaml"])
    ds = find(manifests, "DaemonSet")["spec"]["template"]["spec"]
    (container,) = ds["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    config = tmp_path / "node-config"
    config.mkdir()
    for key, value in find(manifests, "ConfigMap", "mc-mirrorcache-node-config")["data"].items():
        (config / key).write_text(value)
        (config / key).chmod(0o644)
    certs = tmp_path / "certs.d"
    certs.mkdir()
    sc = container["securityContext"]
    name = f"mc-node-{uuid.uuid4().hex[:8]}"
    dockerd.docker("run", "-d", "--name", name, "--network", "none",
                   "--user", str(sc["runAsUser"]), "--read-only",
                   *[a for cap in sc["capabilities"]["drop"] for a in ("--cap-drop", cap)],
                   "--security-opt", "no-new-privileges",
                   "-v", f"{config}:{mounts['node-config']}:ro",
                   "-v", f"{certs}:{mounts['certs-d']}",
                   "--entrypoint", container["command"][0], mirrorcache_image,
                   *container["command"][1:])
    try:
        deadline = time.monotonic() + 30
        while not (certs / "quay.io" / "hosts.toml").exists():
            assert time.monotonic() < deadline, dockerd.docker("logs", name).stderr
            assert inspect(dockerd, name)["State"]["Running"], dockerd.docker("logs", name)
            await asyncio.sleep(0.1)
        assert sorted(p.name for p in certs.iterdir()) == ["docker.io", "quay.io"]
        assert (certs / "docker.io" / "hosts.toml").read_text() == \
            (config / "docker.io.hosts.toml").read_text()
        assert inspect(dockerd, name)["State"]["Running"]  # it stays, to follow changes
    finally:
        dockerd.docker("rm", "-f", name, check=False)
