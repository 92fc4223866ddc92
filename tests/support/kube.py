"""Render the Helm chart and play kubelet with what it renders, without a cluster.

:func:`helm_template` runs ``helm template`` and returns the manifests. :func:`materialise`
takes the rendered Deployment and lays out on disk what a kubelet would give its container:
every ConfigMap, Secret (those the chart renders, and the ``secrets`` the test provides for
the existing Secrets the chart refers to), projected and emptyDir volume as a directory, the
environment with ``secretKeyRef`` and ``fieldRef`` resolved, and the container's args. The
result can be mounted into the built image under dockerd at the same paths
(:meth:`Pod.docker_args`), or checked on the host with the mount paths rebased under a
temp dir (:meth:`Pod.rebased`).
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "mirrorcache"
#: Where .ci/run installs helm and kubectl when they are not on PATH.
TOOLS_DIR = Path("/usr/local/bin")


def helm_binary() -> str | None:
    found = shutil.which("helm")
    if found:
        return found
    path = TOOLS_DIR / "helm"
    return str(path) if os.access(path, os.X_OK) else None


class HelmError(RuntimeError):
    def __init__(self, stderr: str) -> None:
        super().__init__(stderr)
        self.stderr = stderr


def helm(*args: str, chart: Path = CHART, timeout: float = 60) -> str:
    binary = helm_binary()
    assert binary, "helm is not installed"
    proc = subprocess.run([binary, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HELM_CACHE_HOME": "/tmp/helm-test-cache"})
    if proc.returncode != 0:
        raise HelmError(proc.stderr)
    return proc.stdout


def helm_template(values: list[Path] = (), sets: dict[str, str] | None = None,  # type: ignore[assignment]
                  *, release: str = "mc", namespace: str = "mirrors",
                  chart: Path = CHART) -> list[dict[str, Any]]:
    args = ["template", release, str(chart), "--namespace", namespace,
            "--kube-version", "1.30.0"]
    for v in values:
        args += ["-f", str(v)]
    for key, value in (sets or {}).items():
        args += ["--set-string" if isinstance(value, str) else "--set", f"{key}={value}"]
    return [d for d in yaml.safe_load_all(helm(*args, chart=chart)) if d]


def find(manifests: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [m for m in manifests if m["kind"] == kind
             and (name is None or m["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


@dataclass
class Pod:
    """What the kubelet would hand the mirrorcache container."""

    root: Path
    args: list[str]
    env: dict[str, str]
    #: mountPath -> (host directory, read only)
    mounts: dict[str, tuple[Path, bool]] = field(default_factory=dict)
    #: mountPath of emptyDir volumes (tmpfs under docker)
    empty_dirs: list[str] = field(default_factory=list)
    #: mountPath of the persistent cache volume
    volumes: list[str] = field(default_factory=list)
    security: dict[str, Any] = field(default_factory=dict)
    pod_security: dict[str, Any] = field(default_factory=dict)

    def rebase(self, text: str) -> str:
        """``text`` with every mount path replaced by its host directory."""
        for mount_path in sorted(self.mounts, key=len, reverse=True):
            text = text.replace(mount_path + "/", f"{self.mounts[mount_path][0]}/")
        return text

    def docker_args(self, cache_volume: str) -> list[str]:
        """``docker run`` flags that give the container these mounts, env and user."""
        user = self.security.get("runAsUser", self.pod_security.get("runAsUser"))
        group = self.security.get("runAsGroup", self.pod_security.get("runAsGroup"))
        out = ["--user", f"{user}:{group}"]
        if self.security.get("readOnlyRootFilesystem"):
            out.append("--read-only")
        for cap in self.security.get("capabilities", {}).get("drop", []):
            out += ["--cap-drop", cap]
        if self.security.get("allowPrivilegeEscalation") is False:
            out += ["--security-opt", "no-new-privileges"]
        for path, (host, ro) in self.mounts.items():
            out += ["-v", f"{host}:{path}{':ro' if ro else ''}"]
        for path in self.empty_dirs:
            out += ["--tmpfs", f"{path}:uid={user},gid={group}"]
        for path in self.volumes:
            out += ["-v", f"{cache_volume}:{path}"]
        for key, value in self.env.items():
            out += ["-e", f"{key}={value}"]
        return out


def _write(directory: Path, files: dict[str, str | bytes], mode: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        path = directory / name
        if isinstance(content, str):
            path.write_text(content)
        else:
            path.write_bytes(content)
        path.chmod(mode)


def _select(data: dict[str, str | bytes], items: list[dict[str, str]] | None,
            what: str) -> dict[str, str | bytes]:
    if not items:
        return dict(data)
    out = {}
    for item in items:
        assert item["key"] in data, f"{what} has no key {item['key']}"
        out[item["path"]] = data[item["key"]]
    return out


def materialise(manifests: list[dict[str, Any]], root: Path,
                secrets: dict[str, dict[str, str | bytes]] | None = None,
                pod_ip: str = "127.0.0.1") -> Pod:
    """Lay out the Deployment's volumes under ``root`` and resolve its env (see module doc)."""
    # Secrets the chart renders itself (the generated peer secret), then the test's own.
    secrets = {**{m["metadata"]["name"]: {k: base64.b64decode(v) for k, v in
                                          m.get("data", {}).items()}
                  for m in manifests if m["kind"] == "Secret"}, **(secrets or {})}
    deployment = find(manifests, "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    configmaps = {m["metadata"]["name"]: m.get("data", {}) for m in manifests
                  if m["kind"] == "ConfigMap"}
    volumes = {v["name"]: v for v in spec["volumes"]}
    pod = Pod(root=root, args=list(container.get("args", [])), env={},
              security=container.get("securityContext", {}),
              pod_security=spec.get("securityContext", {}))
    for mount in container["volumeMounts"]:
        vol = volumes[mount["name"]]
        path = mount["mountPath"]
        host = root / mount["name"]
        if "configMap" in vol:
            ref = vol["configMap"]
            data = configmaps[ref["name"]]
            _write(host, _select(data, ref.get("items"), f"ConfigMap {ref['name']}"), 0o644)
        elif "secret" in vol:
            ref = vol["secret"]
            data = secrets[ref["secretName"]]
            _write(host, _select(data, ref.get("items"), f"Secret {ref['secretName']}"), 0o644)
        elif "projected" in vol:
            files: dict[str, str | bytes] = {}
            for source in vol["projected"]["sources"]:
                ref = source["secret"]
                files.update(_select(secrets[ref["name"]], ref.get("items"),
                                     f"Secret {ref['name']}"))
            _write(host, files, 0o644)
        elif "emptyDir" in vol:
            pod.empty_dirs.append(path)
            host.mkdir(parents=True, exist_ok=True)
        elif "persistentVolumeClaim" in vol:
            pod.volumes.append(path)
            host.mkdir(parents=True, exist_ok=True)
        else:
            raise AssertionError(f"volume kind not handled: {vol}")
        if "configMap" in vol or "secret" in vol or "projected" in vol:
            pod.mounts[path] = (host, bool(mount.get("readOnly")))
    for var in container.get("env", []):
        if "value" in var:
            pod.env[var["name"]] = var["value"]
        elif "secretKeyRef" in var["valueFrom"]:
            ref = var["valueFrom"]["secretKeyRef"]
            value = secrets[ref["name"]][ref["key"]]
            pod.env[var["name"]] = value if isinstance(value, str) else value.decode()
        elif var["valueFrom"].get("fieldRef", {}).get("fieldPath") == "status.podIP":
            pod.env[var["name"]] = pod_ip
        else:
            raise AssertionError(f"env source not handled: {var}")
    return pod


def rebased_config(pod: Pod, config_mount: str) -> Path:
    """The pod's mirrorcache config with its mount paths pointing at the host directories."""
    host, _ = pod.mounts[config_mount]
    src = host / "mirrorcache.yaml"
    out = pod.root / "host-config.yaml"
    out.write_text(pod.rebase(src.read_text()))
    return out
