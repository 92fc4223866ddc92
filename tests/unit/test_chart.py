"""The Helm chart, checked without a cluster: lint, render, Kubernetes 1.30 schemas, the
rendered mirrorcache config through ``check-config``, refusals of invalid values, NOTES,
and the node-config script run against a directory standing in for a node.

Needs helm (``.ci/run`` installs it); skipped without it, failed without it when CI=true.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.support.kube import (
    CHART,
    HelmError,
    find,
    helm,
    helm_binary,
    helm_template,
    materialise,
    rebased_config,
)
from tests.support.secure import TestCA, write_htpasswd

VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
K8S = "1.30.0"
#: Kinds from CRDs the kubernetes-validate schemas do not have; checked by hand below.
CRD_KINDS = {"ServiceMonitor", "Certificate"}

if helm_binary() is None:
    if os.environ.get("CI") == "true":
        pytest.fail("CI=true but helm is not installed", pytrace=False)
    pytest.skip("helm not installed (.ci/run installs it)", allow_module_level=True)


def fake_secrets(tmp: Path) -> dict[str, dict[str, str | bytes]]:
    """The Secrets the values files refer to, as an operator would have created them."""
    ca = TestCA(tmp / "ca")
    htpasswd = write_htpasswd(tmp / "htpasswd", {"alice": "wonderland"})
    return {
        "hub-credentials": {"token": "hub-secret-token"},
        "ghcr-credentials": {"password": "ghcr-secret"},
        "minio-credentials": {"AWS_ACCESS_KEY_ID": "minio-key",
                              "AWS_SECRET_ACCESS_KEY": "minio-secret-key"},
        "mirror-users": {"htpasswd": htpasswd.read_text()},
        "mirror-tls": {"tls.crt": ca.cert.read_bytes(), "tls.key": ca.key.read_bytes()},
        # what cert-manager writes for the chart's Certificate
        "mc-mirrorcache-tls": {"tls.crt": ca.cert.read_bytes(), "tls.key": ca.key.read_bytes(),
                               "ca.crt": ca.ca_file.read_bytes()},
    }


def check_config(config: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mirrorcache", "check-config", str(config)],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})


@pytest.mark.parametrize("values", VALUES, ids=[v.name for v in VALUES])
def test_lint_and_render_valid_kubernetes_130(values: Path) -> None:
    out = helm("lint", "--strict", str(CHART), "-f", str(values))
    assert "1 chart(s) linted, 0 chart(s) failed" in out
    manifests = helm_template([values])
    kinds = {m["kind"] for m in manifests}
    assert {"Deployment", "Service", "ConfigMap", "ServiceAccount"} <= kinds
    for m in manifests:
        if m["kind"] in CRD_KINDS:
            continue
        # strict: unknown fields are errors too
        kubernetes_validate.validate(m, K8S, strict=True)


def test_kubernetes_validate_catches_a_bad_manifest() -> None:
    """The schema check above has teeth: a wrong field type fails it."""
    deployment = find(helm_template([]), "Deployment")
    deployment["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S, strict=True)


@pytest.mark.parametrize("values", VALUES, ids=[v.name for v in VALUES])
def test_rendered_config_passes_check_config(values: Path, tmp_path: Path) -> None:
    manifests = helm_template([values])
    pod = materialise(manifests, tmp_path / "pod", fake_secrets(tmp_path))
    config_path = pod.args[pod.args.index("--config") + 1]
    assert pod.args[0] == "serve"
    config = rebased_config(pod, os.path.dirname(config_path))
    proc = check_config(config, pod.env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    raw = yaml.safe_load(config.read_text())
    assert proc.stdout.startswith(f"ok: {len(raw['upstreams'])} upstreams")


def test_secure_values_wire_every_secret(tmp_path: Path) -> None:
    manifests = helm_template([CHART / "ci" / "auth-tls-policy-values.yaml"])
    cfg = yaml.safe_load(find(manifests, "ConfigMap", "mc-mirrorcache")["data"]
                         ["mirrorcache.yaml"])
    assert cfg["upstreams"]["docker.io"] == {
        "url": "https://registry-1.docker.io", "username": "hubuser",
        "password_env": "MIRRORCACHE_UPSTREAM_0_PASSWORD"}
    assert cfg["upstreams"]["ghcr.io"]["password_file"] == \
        "/etc/mirrorcache/upstreams/1/password"
    assert cfg["auth"]["htpasswd"] == "/etc/mirrorcache/auth/htpasswd"
    assert cfg["tls"] == {"cert": "/etc/mirrorcache/tls/tls.crt",
                          "key": "/etc/mirrorcache/tls/tls.key"}
    assert cfg["policy"]["file"] == "/etc/mirrorcache/policy/policy.yaml"
    # No secret value is in any rendered object.
    text = yaml.safe_dump_all(manifests)
    for secret in ("hub-secret-token", "ghcr-secret", "wonderland"):
        assert secret not in text
    container = find(manifests, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http",
                                                     "scheme": "HTTPS"}
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    policy = yaml.safe_load(find(manifests, "ConfigMap", "mc-mirrorcache-policy")["data"]
                            ["policy.yaml"])
    assert policy["default"] == "deny" and policy["rules"][1]["groups"] == ["ci"]
    # The policy file is wrong-or-right on its own: mirrorcache policy test reads it.
    pod = materialise(manifests, tmp_path / "pod", fake_secrets(tmp_path))
    config = rebased_config(pod, "/etc/mirrorcache/config")
    decide = subprocess.run(
        [sys.executable, "-m", "mirrorcache", "policy", "test", "ghcr.io/acme/app:v1",
         "--config", str(config), "--user", "alice"],
        capture_output=True, text=True, env={**os.environ, **pod.env}, timeout=60)
    assert decide.returncode == 0 and decide.stdout.startswith("allow"), decide
    deny = subprocess.run(
        [sys.executable, "-m", "mirrorcache", "policy", "test", "ghcr.io/other/app:v1",
         "--config", str(config)],
        capture_output=True, text=True, env={**os.environ, **pod.env}, timeout=60)
    assert deny.returncode == 1 and deny.stdout.startswith("deny")


def test_security_context_and_storage_modes() -> None:
    manifests = helm_template([])
    spec = find(manifests, "Deployment")["spec"]["template"]["spec"]
    sc = spec["containers"][0]["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["runAsNonRoot"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["securityContext"]["runAsUser"] == 10001
    vols = {v["name"]: v for v in spec["volumes"]}
    assert vols["cache"]["persistentVolumeClaim"]["claimName"] == "mc-mirrorcache-cache"
    assert find(manifests, "Deployment")["spec"]["strategy"]["type"] == "Recreate"
    assert find(manifests, "PersistentVolumeClaim")["spec"]["resources"]["requests"] == {
        "storage": "50Gi"}
    empty = helm_template([CHART / "ci" / "emptydir-values.yaml"])
    assert "PersistentVolumeClaim" not in {m["kind"] for m in empty}
    vols = {v["name"]: v for v in find(empty, "Deployment")["spec"]["template"]["spec"]
            ["volumes"]}
    assert vols["cache"] == {"name": "cache", "emptyDir": {"sizeLimit": "20Gi"}}
    claim = helm_template([], {"storage.filesystem.persistence.existingClaim": "mine"})
    assert "PersistentVolumeClaim" not in {m["kind"] for m in claim}


def _config(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    cfg: dict[str, Any] = yaml.safe_load(find(manifests, "ConfigMap", "mc-mirrorcache")["data"]
                                         ["mirrorcache.yaml"])
    return cfg


def test_s3_irsa_values_render_s3_config_without_keys() -> None:
    manifests = helm_template([CHART / "ci" / "s3-irsa-values.yaml"])
    cfg = _config(manifests)
    assert cfg["storage"] == {"s3": {
        "bucket": "mirrorcache-prod", "region": "eu-west-1", "prefix": "mirror/",
        "sse": "aws:kms", "kms_key_id": "alias/mirrorcache",
        "storage_class": "INTELLIGENT_TIERING", "part_size": "16MiB",
        "local_cache": {"path": "/var/cache/mirrorcache", "max_size": "8GiB"}}}
    sa = find(manifests, "ServiceAccount")
    assert sa["metadata"]["annotations"] == {
        "eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/mirrorcache"}
    deployment = find(manifests, "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    # IRSA: no AWS keys in the env; the HPA owns the replica count; pods roll one by one.
    assert not any(e["name"].startswith("AWS_") for e in spec["containers"][0]["env"])
    assert "replicas" not in deployment["spec"]
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    assert find(manifests, "HorizontalPodAutoscaler")["spec"]["minReplicas"] == 2
    assert "PersistentVolumeClaim" not in {m["kind"] for m in manifests}
    mounts = {m["name"]: m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
    assert mounts["cache"] == "/var/cache/mirrorcache"
    vols = {v["name"]: v for v in spec["volumes"]}
    assert vols["cache"]["emptyDir"] == {"sizeLimit": "10Gi"}


def test_cluster_values_wire_peers_secret_and_headless_service() -> None:
    manifests = helm_template([CHART / "ci" / "cluster-s3-values.yaml"])
    cfg = _config(manifests)
    assert cfg["cluster"] == {
        "peers": {"dns": "mc-mirrorcache-peers.mirrors.svc.cluster.local:5000"},
        "secret_file": "/etc/mirrorcache/cluster/secret", "peer_request_timeout": "30s"}
    assert cfg["storage"]["s3"]["endpoint_url"] == "http://minio.minio.svc:9000"
    assert cfg["storage"]["s3"]["addressing_style"] == "path"
    peers = find(manifests, "Service", "mc-mirrorcache-peers")["spec"]
    assert peers["clusterIP"] == "None" and peers["publishNotReadyAddresses"] is True
    assert peers["selector"] == find(manifests, "Service", "mc-mirrorcache")["spec"]["selector"]
    secret = find(manifests, "Secret", "mc-mirrorcache-peer")
    assert secret["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert len(base64.b64decode(secret["data"]["secret"])) == 48
    deployment = find(manifests, "Deployment")
    assert deployment["spec"]["replicas"] == 3
    assert find(manifests, "PodDisruptionBudget")["spec"]["minAvailable"] == 2
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["valueFrom"] for e in container["env"]}
    assert env["POD_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert env["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "minio-credentials",
                                                         "key": "AWS_ACCESS_KEY_ID"}}
    assert env["AWS_SECRET_ACCESS_KEY"]["secretKeyRef"]["key"] == "AWS_SECRET_ACCESS_KEY"
    # A given peer Secret replaces the generated one; static peers replace the DNS name.
    given = helm_template([CHART / "ci" / "cluster-s3-values.yaml"], {
        "cluster.peerSecret.existingSecret": "peers", "cluster.peerSecret.key": "token",
        "cluster.peers[0]": "10.0.0.1:5000", "cluster.peers[1]": "10.0.0.2:5000"})
    assert "Secret" not in {m["kind"] for m in given}
    assert _config(given)["cluster"]["peers"] == ["10.0.0.1:5000", "10.0.0.2:5000"]
    vol = next(v for v in find(given, "Deployment")["spec"]["template"]["spec"]["volumes"]
               if v["name"] == "cluster")
    assert vol["secret"]["secretName"] == "peers"
    assert vol["secret"]["items"] == [{"key": "token", "path": "secret"}]


def test_filesystem_limits_retention_and_pins() -> None:
    manifests = helm_template([CHART / "ci" / "filesystem-limits-pins-values.yaml"])
    cfg = _config(manifests)
    assert cfg["storage"] == {"filesystem": {"path": "/var/lib/mirrorcache"},
                              "max_size": "45GiB", "high_watermark": 0.9,
                              "low_watermark": 0.75}
    assert cfg["retention"] == {"unused_for": "720h"}
    assert cfg["pins"][0] == "docker.io/library/alpine:3.*"
    assert "cluster" not in cfg
    assert find(manifests, "Deployment")["spec"]["strategy"]["type"] == "Recreate"
    # The defaults keep the config as it was: no limit, no retention, no pins.
    plain = _config(helm_template([]))
    assert plain["storage"] == {"filesystem": {"path": "/var/lib/mirrorcache"}}
    assert not {"retention", "pins", "cluster"} & set(plain)


def test_checksum_rolls_on_config_change_but_not_on_policy_change() -> None:
    def checksum(sets: dict[str, Any]) -> str:
        d = find(helm_template([], {"policy.enabled": True, **sets}), "Deployment")
        value: str = d["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
        return value

    base = checksum({})
    assert checksum({"config.log.level": "debug"}) != base
    assert checksum({"policy.rules[0].allow": "docker.io/**"}) == base


S3 = {"storage.type": "s3", "storage.s3.bucket": "cache-bucket"}


@pytest.mark.parametrize("sets, message", [
    ({"storage.type": "s3"}, "storage.s3.bucket: String length must be greater than or equal "
                             "to 3"),
    ({**S3, "storage.s3.bucket": "Not_A_Bucket"}, "storage.s3.bucket: Does not match pattern"),
    ({**S3, "storage.s3.localCache.maxSize": ""}, "storage.s3.localCache.maxSize: Does not "
                                                  "match pattern"),
    ({**S3, "storage.maxSize": "10Gi"}, "with storage.type=s3 bound the local tier with "
                                        "storage.s3.localCache.maxSize"),
    ({**S3, "replicaCount": 2, "storage.s3.localCache.persistence.enabled": True},
     "one ReadWriteOnce claim, which several replicas cannot share"),
    ({**S3, "storage.s3.sse": "rot13"}, "storage.s3.sse must be one of the following"),
    ({"replicaCount": 3}, "replicaCount=3 needs shared storage"),
    ({"autoscaling.enabled": True}, "autoscaling.enabled needs shared storage"),
    ({"cluster.enabled": True}, "cluster.enabled needs shared storage (storage.type=s3)"),
    ({**S3, "cluster.enabled": True, "cluster.peers[0]": "no-port"}, "cluster.peers.0: Does "
                                                                     "not match pattern"),
    ({"cluster.secret": "x"}, "Additional property secret is not allowed"),
    ({"pins[0]": "docker.io/library/alpine 3"}, "pins.0: Does not match pattern"),
    ({"retention.unusedFor": "forever"}, "retention.unusedFor"),
    ({"mirroring[0].from": "docker.io"}, "mirroring entries (scheduled mirroring) are not "
                                         "implemented"),
    ({"config.log.level": "loud"}, "config.log.level must be one of the following: \"debug\""),
    ({"storage.type": "nfs"}, "storage.type must be one of the following: \"filesystem\", "
                              "\"s3\""),
    ({"tls.enabled": True}, "tls.enabled needs tls.existingSecret"),
    ({"auth.enabled": True}, "auth.enabled needs auth.htpasswd.existingSecret"),
    ({"nodeConfig.enabled": True}, "nodeConfig.enabled needs nodeConfig.mirrorHost"),
    ({"config.defaultUpstream": "nope.io"}, 'config.defaultUpstream "nope.io" is not one of'),
    ({"config.upstreams.docker\\.io.password": "x"}, "config.upstreams.docker.io.password"),
    ({"config.upstreams.Bad_Name.url": "https://x.io"}, "Bad_Name"),
])
def test_invalid_values_fail_with_a_clear_message(sets: dict[str, Any], message: str) -> None:
    with pytest.raises(HelmError) as err:
        helm_template([], sets)
    assert message in err.value.stderr


def notes(tmp_path: Path, values: list[Path]) -> str:
    """NOTES.txt as ``helm install`` prints it (helm template skips NOTES: render its
    named template through a scratch copy of the chart)."""
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    (chart / "templates" / "notes-test.yaml").write_text(
        'notes: |\n{{ include "mirrorcache.notes" . | indent 2 }}\n')
    rendered = helm("template", "mc", str(chart), "--namespace", "mirrors",
                    "--show-only", "templates/notes-test.yaml",
                    *[a for v in values for a in ("-f", str(v))], chart=chart)
    text: str = yaml.safe_load(rendered)["notes"]
    return text


def _toml_blocks(text: str, marker: str) -> list[dict[str, Any]]:
    """TOML snippets in the notes: the indented lines after each line containing marker."""
    blocks, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        if marker in line:
            body = []
            for nxt in lines[i + 1:]:
                if nxt and not nxt.startswith("  "):
                    break
                if nxt.strip().startswith("#"):
                    break
                body.append(nxt[2:])
            blocks.append(tomllib.loads("\n".join(body)))
    return blocks


def test_notes_print_client_snippets_for_http_and_https(tmp_path: Path) -> None:
    plain = notes(tmp_path / "a", [])
    assert "serving http://mc-mirrorcache.mirrors.svc:5000" in plain
    hosts = _toml_blocks(plain, "/etc/containerd/certs.d/docker.io/hosts.toml")
    assert hosts == [{"server": "https://registry-1.docker.io", "host": {
        "http://mc-mirrorcache.mirrors.svc:5000": {"capabilities": ["pull", "resolve"]}}}]
    assert ('{ "registry-mirrors": ["http://mc-mirrorcache.mirrors.svc:5000"], '
            '"insecure-registries": ["mc-mirrorcache.mirrors.svc:5000"] }') in plain
    assert 'location = "mc-mirrorcache.mirrors.svc:5000/quay.io"' in plain
    assert "insecure = true" in plain

    secure = notes(tmp_path / "b", [CHART / "ci" / "ingress-monitoring-values.yaml"])
    hosts = _toml_blocks(secure, "/etc/containerd/certs.d/quay.io/hosts.toml")
    assert hosts == [{"server": "https://quay.io", "host": {
        "https://mirror.example.com": {"capabilities": ["pull", "resolve"]}}}]
    assert '{ "registry-mirrors": ["https://mirror.example.com"] }' in secure
    assert "insecure" not in secure


def test_node_config_daemonset_writes_hosts_toml(tmp_path: Path) -> None:
    """The DaemonSet's script, run once against a directory standing in for the node's
    /etc/containerd/certs.d, writes one hosts.toml per chosen upstream."""
    manifests = helm_template([CHART / "ci" / "nodeconfig-values.yaml"])
    ds = find(manifests, "DaemonSet")
    container = ds["spec"]["template"]["spec"]["containers"][0]
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    host_path = next(v["hostPath"] for v in ds["spec"]["template"]["spec"]["volumes"]
                     if "hostPath" in v)
    assert host_path == {"path": "/etc/containerd/certs.d", "type": "DirectoryOrCreate"}
    data = find(manifests, "ConfigMap", "mc-mirrorcache-node-config")["data"]
    src, node = tmp_path / "node-config", tmp_path / "certs.d"
    src.mkdir()
    for key, value in data.items():
        (src / key).write_text(value)
    script = data["sync.sh"].replace("/node-config", str(src)).replace(
        "/host-certs.d", str(node)).replace("sleep 60", "break")
    proc = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in node.iterdir()) == ["docker.io", "quay.io"]
    hosts = tomllib.loads((node / "docker.io" / "hosts.toml").read_text())
    assert hosts == {"server": "https://registry-1.docker.io", "host": {
        "http://127.0.0.1:30500": {"capabilities": ["pull", "resolve"]}}}
    assert tomllib.loads((node / "quay.io" / "hosts.toml").read_text())["server"] == \
        "https://quay.io"
