"""The Helm chart, checked without a cluster: lint, render, Kubernetes 1.30 schemas, the
rendered mirrorcache config through ``check-config``, refusals of invalid values, NOTES,
and the node-config script run against a directory standing in for a node.

Needs helm (``.ci/run`` installs it); skipped without it, failed without it when CI=true.
"""

from __future__ import annotations

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


def test_checksum_rolls_on_config_change_but_not_on_policy_change() -> None:
    def checksum(sets: dict[str, Any]) -> str:
        d = find(helm_template([], {"policy.enabled": True, **sets}), "Deployment")
        value: str = d["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
        return value

    base = checksum({})
    assert checksum({"config.log.level": "debug"}) != base
    assert checksum({"policy.rules[0].allow": "docker.io/**"}) == base


@pytest.mark.parametrize("sets, message", [
    ({"storage.type": "s3"}, "storage.s3.bucket: String length must be greater than or equal "
                             "to 1"),
    ({"storage.type": "s3", "storage.s3.bucket": "b"}, "storage.type=s3 requires a mirrorcache "
                                                       "version with S3 storage"),
    ({"replicaCount": 3}, "replicaCount=3 needs shared storage"),
    ({"autoscaling.enabled": True}, "autoscaling.enabled needs shared storage"),
    ({"cluster.enabled": True}, "cluster.enabled requires a mirrorcache version with cluster"),
    ({"pins[0]": "docker.io/library/alpine:3.19"}, "pins require a mirrorcache version"),
    ({"mirroring[0].from": "docker.io"}, "mirroring entries require"),
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
