"""What the chart renders, run in the built image: the closest to "installed" without a cluster.

The Deployment's args, env, volume mounts, user and securityContext (auth from an htpasswd
Secret, TLS from a Secret, the policy ConfigMap, upstream credentials from Secrets) are
materialised as a kubelet would and given to ``docker run`` under the private dockerd;
skopeo pulls through it over TLS with the digests pushed upstream, the policy is enforced
and reloaded when its ConfigMap file changes, and ``docker stop`` ends it with status 0.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

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
from tests.support.s3server import (
    ACCESS_KEY,
    REGION,
    SECRET_KEY,
    MotoServer,
    aws_session,
    make_bucket,
)
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


async def test_rendered_cluster_s3_deployment_runs_two_pods_in_image(
        dockerd: Dockerd, mirrorcache_image: str, registry: RegistryProcess,
        moto_server: MotoServer, unique_repo: str, tmp_path: Path) -> None:
    """cluster-s3-values.yaml's Deployment as two pods of the built image on one moto bucket:
    keys from the Secret as AWS_* env, POD_IP from the downward API (127.0.0.1 here, with a
    listen port each, and the peers as a static list since no headless Service DNS exists
    here), the peer secret mounted where cluster.secret_file says. Both pods pull at once:
    each blob reaches upstream once, and the bytes are the ones pushed."""
    if helm_binary() is None:
        pytest.skip("helm not installed")
    img = make_image([250_000, 60_000, 9_000], media="oci", seed=3)
    await push_image(registry.url, unique_repo, img, "v1")
    bucket = await make_bucket(moto_server)
    ports = [free_port(), free_port()]
    peers = {f"cluster.peers[{i}]": f"127.0.0.1:{p}" for i, p in enumerate(ports)}
    secrets: dict[str, dict[str, str | bytes]] = {
        "minio-credentials": {"AWS_ACCESS_KEY_ID": ACCESS_KEY,
                              "AWS_SECRET_ACCESS_KEY": SECRET_KEY},
        "mc-peers": {"secret": "a-peer-secret-both-pods-share-0123"},
    }
    names = [f"mc-s3-{i}-{uuid.uuid4().hex[:8]}" for i in range(2)]
    async with CountingProxy(registry.url) as upstream:
        try:
            for i, (name, port) in enumerate(zip(names, ports, strict=True)):
                manifests = helm_template([CHART / "ci" / "cluster-s3-values.yaml"], {
                    "config.port": port,
                    # POD_IP:port is how the peers know it; loopback only under --network host.
                    "config.extra.listen": f"127.0.0.1:{port}",
                    "config.upstreams.docker\\.io.url": upstream.url,
                    "storage.s3.endpoint": moto_server.url,
                    "storage.s3.bucket": bucket,
                    "cluster.peerSecret.existingSecret": "mc-peers",
                    **peers,
                })
                cfg = yaml.safe_load(find(manifests, "ConfigMap", "mc-mirrorcache")["data"]
                                     ["mirrorcache.yaml"])
                assert cfg["cluster"]["secret_file"] == "/etc/mirrorcache/cluster/secret"
                assert cfg["storage"]["s3"]["local_cache"]["path"] == "/var/cache/mirrorcache"
                pod = materialise(manifests, tmp_path / f"pod{i}", secrets, pod_ip="127.0.0.1")
                assert pod.env["POD_IP"] == "127.0.0.1"
                assert pod.env["AWS_ACCESS_KEY_ID"] == ACCESS_KEY
                assert "/var/cache/mirrorcache" in pod.empty_dirs
                dockerd.docker("run", "-d", "--name", name, "--network", "host",
                               "-e", f"MIRRORCACHE_HEALTH_URL=http://127.0.0.1:{port}/healthz",
                               *pod.docker_args(f"{name}-cache"), mirrorcache_image, *pod.args)
            for name, port in zip(names, ports, strict=True):
                await wait_ready(f"http://127.0.0.1:{port}/readyz", name, dockerd)
            # Each pod is the member POD_IP:port says and knows both (static peers).
            members = sorted(f"127.0.0.1:{p}" for p in ports)
            for name, port in zip(names, ports, strict=True):
                (started,) = _events(dockerd, name, "cluster.started")
                assert started["member"] == f"127.0.0.1:{port}"
                assert sorted(started["members"]) == members
            # The first pod found the second not yet listening (cluster.member_down) and
            # leaves it out of ownership until a probe succeeds: wait for that.
            deadline = time.monotonic() + 30
            for name, other in zip(names, reversed(ports), strict=True):
                while not _peer_healthy(dockerd, name, f"127.0.0.1:{other}"):
                    assert time.monotonic() < deadline, f"{name} never saw its peer up"
                    await asyncio.sleep(0.2)
            copies = await asyncio.gather(*[
                skopeo_copy(f"127.0.0.1:{port}/docker.io/{unique_repo}:v1",
                            tmp_path / f"out{i}") for i, port in enumerate(ports)])
            for copy in copies:
                assert manifest_digest(copy.dest_dir) == img.digest
                assert copied_blob_digests(copy.dest_dir) == img.blob_digests
            assert upstream.count("GET", "blob") == len(img.blob_digests)
            async with aws_session().create_client(
                    "s3", endpoint_url=moto_server.url, region_name=REGION) as s3:
                listed = await s3.list_objects_v2(Bucket=bucket)
            keys = [o["Key"] for o in listed.get("Contents", [])]
            for digest in img.blob_digests:
                assert any(digest.split(":")[1] in key for key in keys), (digest, keys)
            for name in names:
                dockerd.docker("stop", "-t", "20", name, timeout=60)
                assert inspect(dockerd, name)["State"]["ExitCode"] == 0
                logs = dockerd.docker("logs", name)
                assert SECRET_KEY not in logs.stdout + logs.stderr
                assert "a-peer-secret" not in logs.stdout + logs.stderr
        finally:
            for name in names:  # shown when the test fails
                logs = dockerd.docker("logs", "--tail", "60", name, check=False)
                print(f"--- {name}\n{logs.stdout}{logs.stderr}")
                dockerd.docker("rm", "-f", "-v", name, check=False)
                dockerd.docker("volume", "rm", "-f", f"{name}-cache", check=False)


def _peer_healthy(dockerd: Dockerd, name: str, member: str) -> bool:
    """Whether the container's log leaves ``member`` healthy (peers start healthy; each
    cluster.member_down / cluster.member_up event flips that)."""
    healthy = True
    for event in _events(dockerd, name, "cluster.member_down", "cluster.member_up"):
        if event.get("member") == member:
            healthy = event["event"] == "cluster.member_up"
    return healthy


def _events(dockerd: Dockerd, name: str, *events: str) -> list[dict[str, Any]]:
    """The JSON log events called one of ``events`` in a container's log, in order."""
    logs = dockerd.docker("logs", name, check=False)
    found = []
    for line in (logs.stdout + logs.stderr).splitlines():
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if isinstance(data, dict) and data.get("event") in events:
            found.append(data)
    return found
