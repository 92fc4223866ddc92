"""Allowlist/denylist end to end: skopeo pulls through the mirror, counted at the upstream.

A refused pull gets 403 DENIED naming the rule, and nothing of it reaches the upstream (a
CountingProxy sees zero requests), cached content included.
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from mirrorcache.api.access import POLICY
from tests.support.countingproxy import CountingProxy
from tests.support.images import Image, make_image, push_image
from tests.support.mirror import Mirror, mirror_config
from tests.support.registry import RegistryProcess
from tests.support.skopeo import SkopeoError, copied_blob_digests, manifest_digest, skopeo_copy
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

POLICY_V1 = """\
rules:
  - deny: docker.io/blocked/**
  - allow: docker.io/library/*
  - allow: docker.io/acme/*:v*
  - deny: docker.io/acme/*:*
  - allow: docker.io/acme/*
"""


class Env:
    def __init__(self, mirror: Mirror, hub: CountingProxy, registry: RegistryProcess,
                 policy_file: Path) -> None:
        self.mirror = mirror
        self.hub = hub
        self.registry = registry
        self.policy_file = policy_file

    async def push(self, repo: str, tag: str = "v1") -> Image:
        img = make_image([3000, 9000], media="oci")
        await push_image(self.registry.url, repo, img, tag)
        return img

    async def wait_for(self, cond: Callable[[], bool], timeout: float = 5.0) -> None:
        await wait_until(cond, timeout=timeout, what="policy reload")


def _env_fixture(reload_interval: str) -> Any:
    @pytest.fixture
    async def fixture(tmp_path: Path, registry: RegistryProcess) -> AsyncIterator[Env]:
        policy_file = tmp_path / "policy.yaml"
        policy_file.write_text(POLICY_V1)
        async with CountingProxy(registry.url) as hub:
            raw = mirror_config(tmp_path, {"docker.io": {"url": hub.url}},
                                policy={"file": str(policy_file),
                                        "reload_interval": reload_interval})
            async with Mirror(raw) as mirror:
                yield Env(mirror, hub, registry, policy_file)
    return fixture


env = _env_fixture("50ms")
hup_env = _env_fixture("1h")


def name() -> str:
    return uuid.uuid4().hex[:10]


async def oci_error(resp: aiohttp.ClientResponse) -> tuple[int, str, str]:
    doc = await resp.json()
    return resp.status, doc["errors"][0]["code"], doc["errors"][0]["message"]


async def test_allowed_and_denied_pulls(env: Env, tmp_path: Path) -> None:
    n = name()
    allowed = await env.push(f"library/{n}")
    blocked = await env.push(f"blocked/team/{n}")
    unlisted = await env.push(f"other/{n}")
    env.hub.reset()

    out = await skopeo_copy(f"{env.mirror.host}/{n}:v1", tmp_path / "ok")
    assert manifest_digest(out.dest_dir) == allowed.digest
    assert copied_blob_digests(out.dest_dir) == set(allowed.blob_digests)
    assert env.hub.count("GET", "blob") == len(allowed.blob_digests)

    env.hub.reset()
    with capture_logs() as logs:
        with pytest.raises(SkopeoError) as err:
            await skopeo_copy(f"{env.mirror.host}/blocked/team/{n}:v1", tmp_path / "no1")
        assert "rules[0] (deny docker.io/blocked/**)" in err.value.stderr
        with pytest.raises(SkopeoError) as err:
            await skopeo_copy(f"{env.mirror.host}/docker.io/other/{n}:v1", tmp_path / "no2")
        assert "not on the allowlist" in err.value.stderr

        # Every endpoint of a refused repository, by tag and by digest, GET and HEAD.
        async with aiohttp.ClientSession() as http:
            base = f"{env.mirror.url}/v2/other/{n}"
            layer = unlisted.layers[0].digest
            for path in ("/manifests/v1", f"/manifests/{unlisted.digest}", f"/blobs/{layer}",
                         "/tags/list", f"/referrers/{unlisted.digest}"):
                async with http.get(base + path) as resp:
                    assert await oci_error(resp) == (
                        403, "DENIED", f"docker.io/other/{n}"
                        + (":v1" if path.endswith("v1") else "") + " is not on the allowlist")
                async with http.head(base + path) as resp:
                    assert resp.status == 403
            async with http.get(f"{env.mirror.url}/v2/blocked/team/{n}/blobs/"
                                f"{blocked.layers[0].digest}", params={"ns": "docker.io"}) as r:
                status, code, message = await oci_error(r)
                assert (status, code) == (403, "DENIED")
                assert message == (f"pulling docker.io/blocked/team/{n} is denied by policy "
                                   "rules[0] (deny docker.io/blocked/**)")
            async with http.get(f"{env.mirror.url}/metrics") as resp:
                metrics = await resp.text()
    assert env.hub.requests == []
    denied = [e for e in logs if e["event"] == "policy.denied"]
    assert len(denied) >= 12
    assert denied[0]["identity"] == "anonymous" and denied[0]["client"] == "127.0.0.1"
    assert denied[0]["upstream"] == "docker.io"
    assert denied[0]["repository"] == f"blocked/team/{n}"
    assert denied[0]["rule"] == "rules[0] (deny docker.io/blocked/**)"
    count = len(denied)
    assert f'mirrorcache_policy_denied_total{{upstream="docker.io"}} {count}.0' in metrics


async def test_tag_rules_and_digest_pulls(env: Env, tmp_path: Path) -> None:
    n = name()
    img = await env.push(f"acme/{n}", "v2.1")
    await push_image(env.registry.url, f"acme/{n}", img, "latest")
    env.hub.reset()
    out = await skopeo_copy(f"{env.mirror.host}/acme/{n}:v2.1", tmp_path / "tag")
    assert manifest_digest(out.dest_dir) == img.digest
    env.hub.reset()
    with pytest.raises(SkopeoError) as err:
        await skopeo_copy(f"{env.mirror.host}/acme/{n}:latest", tmp_path / "latest")
    assert "rules[3] (deny docker.io/acme/*:*)" in err.value.stderr
    assert env.hub.requests == []
    # By digest, the repository rule (rules[4]) governs: allowed, served from the cache.
    out = await skopeo_copy(f"{env.mirror.host}/acme/{n}@{img.digest}", tmp_path / "digest")
    assert copied_blob_digests(out.dest_dir) == set(img.blob_digests)
    assert env.hub.count(kind="blob") == 0


async def test_reload_on_change_removes_cached_repository(env: Env, tmp_path: Path) -> None:
    n = name()
    img = await env.push(f"library/{n}")
    other = await env.push(f"other/{n}")
    await skopeo_copy(f"{env.mirror.host}/{n}:v1", tmp_path / "warm")
    holder = env.mirror.app[POLICY]
    v1 = holder.current

    # Ops remove library/* from the allowlist: the cached image stops being served.
    env.hub.reset()
    with capture_logs() as logs:
        env.policy_file.write_text(f"rules:\n  - allow: docker.io/other/{n}\n")
        await env.wait_for(lambda: holder.current is not v1)
    assert [e["event"] for e in logs if e["event"].startswith("policy.")] == ["policy.reloaded"]
    assert logs[-1]["trigger"] == "file_changed" and logs[-1]["rules"] == 1
    with pytest.raises(SkopeoError) as err:
        await skopeo_copy(f"{env.mirror.host}/{n}:v1", tmp_path / "gone")
    assert "not on the allowlist" in err.value.stderr
    async with aiohttp.ClientSession() as http:
        for ref in (img.digest, f"blobs/{img.layers[0].digest}"):
            path = f"manifests/{ref}" if not ref.startswith("blobs/") else ref
            async with http.get(f"{env.mirror.url}/v2/library/{n}/{path}") as resp:
                assert resp.status == 403
    assert env.hub.requests == []
    out = await skopeo_copy(f"{env.mirror.host}/other/{n}:v1", tmp_path / "other")
    assert manifest_digest(out.dest_dir) == other.digest
    v2 = holder.current

    # A broken file is rejected with a logged error; the rules in force stay.
    with capture_logs() as logs:
        env.policy_file.write_text("rules:\n  - allow: docker.io/library/*\n  - allow: [\n")
        await env.wait_for(lambda: any(e["event"] == "policy.reload_failed" for e in logs))
    assert holder.current is v2
    failed = next(e for e in logs if e["event"] == "policy.reload_failed")
    assert failed["log_level"] == "error" and failed["rules_in_force"] == 1
    env.hub.reset()
    with pytest.raises(SkopeoError):
        await skopeo_copy(f"{env.mirror.host}/{n}:v1", tmp_path / "still-gone")
    assert env.hub.requests == []
    out = await skopeo_copy(f"{env.mirror.host}/other/{n}:v1", tmp_path / "other2")
    assert manifest_digest(out.dest_dir) == other.digest
    assert env.hub.count(kind="blob") == 0

    # A good file again: library is back, straight from the cache.
    env.policy_file.write_text(POLICY_V1)
    await env.wait_for(lambda: holder.current is not v2)
    out = await skopeo_copy(f"{env.mirror.host}/{n}:v1", tmp_path / "back")
    assert copied_blob_digests(out.dest_dir) == set(img.blob_digests)
    assert env.hub.count(kind="blob") == 0


async def test_reload_on_sighup(hup_env: Env, tmp_path: Path) -> None:
    env = hup_env
    assert signal.getsignal(signal.SIGHUP) not in (signal.SIG_DFL, signal.SIG_IGN, None)
    n = name()
    await env.push(f"library/{n}")
    await skopeo_copy(f"{env.mirror.host}/{n}:v1", tmp_path / "warm")
    holder = env.mirror.app[POLICY]
    v1 = holder.current
    env.policy_file.write_text("rules: []\ndefault: deny\n")
    # The change is visible to the watcher, but polling is hourly here: only the signal
    # reloads (no sleep could prove more than this).
    assert holder.changed()
    assert holder.current is v1
    with capture_logs() as logs:
        os.kill(os.getpid(), signal.SIGHUP)
        await env.wait_for(lambda: holder.current is not v1)
    assert logs[0]["event"] == "policy.reloaded" and logs[0]["trigger"] == "sighup"
    env.hub.reset()
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{env.mirror.url}/v2/library/{n}/manifests/v1") as resp:
            assert await oci_error(resp) == (403, "DENIED",
                                             f"docker.io/library/{n}:v1 is not on the allowlist")
    assert env.hub.requests == []
    # A broken file on SIGHUP: rejected, the deny-all rules stay.
    env.policy_file.write_text("rules: {oops}\n")
    v2 = holder.current
    with capture_logs() as logs:
        os.kill(os.getpid(), signal.SIGHUP)
        await env.wait_for(lambda: any(e["event"] == "policy.reload_failed" for e in logs))
    assert holder.current is v2
