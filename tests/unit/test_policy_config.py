"""The policy/auth/tls config sections, reloading a policy file, and `mirrorcache policy test`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import bcrypt
import pytest
import yaml
from structlog.testing import capture_logs

from mirrorcache.cli import main, split_image_reference
from mirrorcache.config import ConfigError, parse_config
from mirrorcache.policy import Policy, Rule
from mirrorcache.policy_reload import PolicyHolder

HASH = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()


def base(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    return {"storage": {"filesystem": {"path": str(tmp_path / "c")}},
            "upstreams": {"docker.io": {"url": "http://127.0.0.1:1"},
                          "quay.io": {"url": "http://127.0.0.1:2"}},
            "default_upstream": "docker.io", **extra}


def problems(raw: dict[str, Any], environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse_config(raw, environ or {})
    return err.value.problems


def test_defaults_keep_old_behaviour(tmp_path: Path) -> None:
    cfg = parse_config(base(tmp_path), {})
    assert cfg.policy.policy == Policy() and cfg.policy.file is None
    assert not cfg.auth.enabled and cfg.tls is None


def test_inline_policy_and_auth(tmp_path: Path) -> None:
    (tmp_path / "htpasswd").write_text(f"alice:{HASH}\n")
    (tmp_path / "tokens").write_text("ci:0123456789abcdef0\n")
    cfg = parse_config(base(tmp_path, policy={"rules": [
        {"allow": "quay.io/team-a/**", "groups": ["team-a"]},
        {"allow": "docker.io/library/*", "anonymous": True}]},
        auth={"enabled": True, "htpasswd": str(tmp_path / "htpasswd"),
              "tokens_file": str(tmp_path / "tokens"), "tokens_env": "TOK",
              "groups": {"team-a": ["alice", "ci"]}, "failed_login_window": "5m"}),
        {"TOK": "bot:abcdefghijklmnop0"})
    assert cfg.policy.policy.rules[0] == Rule("quay.io/team-a/**", "allow",
                                              groups=frozenset({"team-a"}))
    assert cfg.auth.users == {"alice": HASH}
    assert set(cfg.auth.tokens) == {"ci", "bot"}
    assert cfg.auth.groups == {"team-a": frozenset({"alice", "ci"})}
    assert cfg.auth.failed_login_window == 300.0
    assert "pw" not in repr(cfg.auth) and HASH not in repr(cfg)


def test_section_problems(tmp_path: Path) -> None:
    (tmp_path / "h").write_text("md5:$apr1$x$y\n")
    found = problems(base(tmp_path, policy={"rules": [{"allow": "x"}], "colour": 1},
                          auth={"enabled": True, "htpasswd": str(tmp_path / "h"),
                                "tokens_env": "NOPE", "bogus": 1},
                          tls={"cert": str(tmp_path / "missing.pem")}))
    assert "policy.colour: unknown key" in found
    assert any(p.startswith("policy.rules[0].allow: 'x'") for p in found)
    assert any(p.startswith("auth.htpasswd: line 1: user 'md5'") for p in found)
    assert "auth.tokens_env: environment variable NOPE is not set" in found
    assert "auth.bogus: unknown key" in found
    assert "auth.enabled: no users: set htpasswd, tokens_file or tokens_env" in found
    assert f"tls.cert: no such file: {tmp_path / 'missing.pem'}" in found
    assert "tls.key: is required" in found


def test_users_in_rules_need_auth(tmp_path: Path) -> None:
    found = problems(base(tmp_path, policy={"rules": [{"allow": "quay.io/a/*",
                                                        "users": ["ci"]}]}))
    assert found == ["policy: rules[0] (allow quay.io/a/* users=ci) names users or groups, "
                     "but auth is not enabled (every caller is anonymous)"]


def test_policy_file(tmp_path: Path) -> None:
    f = tmp_path / "policy.yaml"
    f.write_text("rules:\n  - allow: docker.io/library/*\n")
    cfg = parse_config(base(tmp_path, policy={"file": str(f), "reload_interval": "1s"}), {})
    assert cfg.policy.file == f and cfg.policy.reload_interval == 1.0
    assert len(cfg.policy.policy.rules) == 1
    f.write_text("rules: [{deny: nohost}]\n")
    found = problems(base(tmp_path, policy={"file": str(f), "rules": []}))
    assert "policy.rules: set either policy.file or inline rules/default, not both" in found
    assert any(p.startswith(f"policy.file: {f}: rules[0].deny:") for p in found)


def test_holder_reload_is_atomic(tmp_path: Path) -> None:
    f = tmp_path / "policy.yaml"
    f.write_text("rules:\n  - allow: docker.io/library/*\n")
    holder = PolicyHolder(Policy(), f)
    assert not holder.changed()
    with capture_logs() as logs:
        assert holder.reload("test")
        first = holder.current
        f.write_text("rules:\n  - allow: docker.io/library/*\n  - deny: [\n")
        assert holder.changed()
        assert not holder.reload("test")
        assert holder.current is first and not holder.changed()
        f.write_text("")  # truncated file: refused, never "allow everything"
        assert not holder.reload("test") and holder.current is first
        f.unlink()
        assert not holder.reload("test") and holder.current is first
    assert [e["event"] for e in logs] == ["policy.reloaded"] + ["policy.reload_failed"] * 3
    assert logs[1]["rules_in_force"] == 1 and logs[1]["problems"]
    with capture_logs() as logs:
        assert not PolicyHolder(Policy()).reload("sighup")
    assert logs[0]["event"] == "policy.reload_skipped"


@pytest.mark.parametrize(("ref", "expected"), [
    ("alpine", ("alpine", "latest")),
    ("docker.io/library/alpine:3.19", ("docker.io/library/alpine", "3.19")),
    ("localhost:5000/x", ("localhost:5000/x", "latest")),
    ("localhost:5000/x:1", ("localhost:5000/x", "1")),
    ("quay.io/a/b@sha256:" + "a" * 64, ("quay.io/a/b", None)),
    ("quay.io/a/b:v1@sha256:" + "a" * 64, ("quay.io/a/b", None)),
])
def test_split_image_reference(ref: str, expected: tuple[str, str | None]) -> None:
    assert split_image_reference(ref) == expected


def test_cli_policy_test(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "htpasswd").write_text(f"alice:{HASH}\n")
    cfg_path = tmp_path / "mirrorcache.yaml"
    cfg_path.write_text(yaml.safe_dump(base(tmp_path, policy={"rules": [
        {"deny": "docker.io/library/evil*"},
        {"allow": "docker.io/library/*", "anonymous": True},
        {"allow": "quay.io/team-a/**", "groups": ["team-a"]},
    ]}, auth={"enabled": True, "htpasswd": str(tmp_path / "htpasswd"),
              "groups": {"team-a": ["alice"]}})))
    c = ["--config", str(cfg_path)]
    assert main(["policy", "test", "docker.io/library/alpine:3.19", *c]) == 0
    assert capsys.readouterr().out == (
        "allow docker.io/library/alpine:3.19 for anonymous: allowed by rules[1] "
        "(allow docker.io/library/* anonymous)\n")
    assert main(["policy", "test", "evilcorp", *c]) == 1
    assert capsys.readouterr().out == (
        "deny docker.io/library/evilcorp:latest for anonymous: denied by rules[0] "
        "(deny docker.io/library/evil*)\n")
    assert main(["policy", "test", "quay.io/team-a/app@sha256:" + "1" * 64, *c]) == 1
    assert "not on the allowlist" in capsys.readouterr().out
    assert main(["policy", "test", "quay.io/team-a/app:v1", "--user", "alice", *c]) == 0
    assert "for alice: allowed by rules[2]" in capsys.readouterr().out
    assert main(["policy", "test", "ghcr.io/x/y", *c]) == 2
    assert "not configured" in capsys.readouterr().err
    pf = tmp_path / "other.yaml"
    pf.write_text("rules: [{allow: quay.io/**, anonymous: true}]\n")
    assert main(["policy", "test", "quay.io/a/b", "--policy-file", str(pf), *c]) == 0
    pf.write_text("rules: [{allow: nohost}]\n")
    assert main(["policy", "test", "quay.io/a/b", "--policy-file", str(pf), *c]) == 2
