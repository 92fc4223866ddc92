"""Config parsing: typed values, secrets from env/files, problems collected with key paths."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from mirrorcache.cli import main
from mirrorcache.config import ConfigError, load_config, parse_config, parse_duration

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "config" / "mirrorcache.yaml"
UNSET_VAR = "MIRRORCACHE_UNIT_TEST_NEVER_SET_4711"


def _full(tmp_path: Path) -> dict[str, Any]:
    pw_file = tmp_path / "quay-password"
    pw_file.write_text("from-a-file\n")
    return {
        "listen": "127.0.0.1:5050",
        "storage": {"filesystem": {"path": str(tmp_path / "cache")},
                    "metadata_path": str(tmp_path / "meta")},
        "upstreams": {
            "docker.io": {
                "url": "https://registry-1.docker.io/",
                "username": "hubuser",
                "password_env": "HUB_TOKEN",
                "tag_ttl": "10m",
                "tag_stale_while_revalidate": "1h30m",
                "connect_timeout": "500ms",
                "read_timeout": 45,
                "max_retries": 5,
                "breaker_failures": 3,
                "breaker_cooldown": "1m30s",
            },
            "quay.io": {
                "url": "https://quay.io",
                "username": "robot",
                "password_file": str(pw_file),
                "offline": True,
            },
            "localhost:5000": {"url": "http://localhost:5000", "insecure": True},
        },
        "default_upstream": "docker.io",
        "log": {"level": "debug", "format": "json"},
        "workers": 4,
        "shutdown_grace": "45s",
    }


def _problems(data: object, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as exc_info:
        parse_config(data, environ if environ is not None else {})
    return exc_info.value.problems


# --- durations ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("10m", 600.0), ("1h30m", 5400.0), ("500ms", 0.5), ("45s", 45.0), ("1d", 86400.0),
     ("1.5h", 5400.0), (30, 30.0), (2.5, 2.5), (" 10m ", 600.0), ("1m30s", 90.0)],
)
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["10", "ten minutes", "-5s", "", "10x", "m10", True, None,
                                   -1, "1h 30m", [1]])
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


# --- a valid config ----------------------------------------------------------------------


def test_full_config_values(tmp_path: Path) -> None:
    cfg = parse_config(_full(tmp_path), {"HUB_TOKEN": "hub-secret-123"})
    assert (cfg.listen_host, cfg.listen_port) == ("127.0.0.1", 5050)
    assert cfg.storage.filesystem.path == tmp_path / "cache"
    assert cfg.storage.metadata_path == tmp_path / "meta"
    assert cfg.default_upstream == "docker.io"
    assert set(cfg.upstreams) == {"docker.io", "quay.io", "localhost:5000"}
    hub = cfg.upstreams["docker.io"]
    assert hub.url == "https://registry-1.docker.io"  # trailing slash stripped
    assert hub.is_docker_hub
    assert (hub.username, hub.password) == ("hubuser", "hub-secret-123")
    assert hub.tag_ttl == 600.0
    assert hub.tag_stale_while_revalidate == 5400.0
    assert hub.connect_timeout == pytest.approx(0.5)
    assert hub.read_timeout == 45.0
    assert (hub.max_retries, hub.breaker_failures, hub.breaker_cooldown) == (5, 3, 90.0)
    quay = cfg.upstreams["quay.io"]
    assert (quay.username, quay.password) == ("robot", "from-a-file")  # stripped
    assert quay.offline is True and not quay.is_docker_hub
    assert quay.tag_ttl == 600.0  # default
    local = cfg.upstreams["localhost:5000"]
    assert local.insecure is True and local.password is None and local.username is None
    assert (cfg.log.level, cfg.log.format) == ("debug", "json")
    assert cfg.workers == 4
    assert cfg.shutdown_grace == 45.0


def test_password_env_comes_from_passed_environ_not_os_environ(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HUB_TOKEN", "from-os-environ")
    cfg = parse_config(_full(tmp_path), {"HUB_TOKEN": "from-passed-dict"})
    assert cfg.upstreams["docker.io"].password == "from-passed-dict"
    problems = _problems(_full(tmp_path), {})
    assert "upstreams.docker.io.password_env: environment variable HUB_TOKEN is not set" \
        in problems


def test_load_config_from_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_full(tmp_path)))
    cfg = load_config(path, {"HUB_TOKEN": "t"})
    assert cfg.upstreams["docker.io"].tag_ttl == 600.0
    assert cfg.upstreams["quay.io"].password == "from-a-file"


def test_listen_forms() -> None:
    base = {"upstreams": {"quay.io": {"url": "https://quay.io"}}}
    assert parse_config({**base, "listen": ":8080"}, {}).listen_host == "0.0.0.0"
    cfg = parse_config({**base, "listen": "[::1]:8080"}, {})
    assert (cfg.listen_host, cfg.listen_port) == ("::1", 8080)
    defaults = parse_config(base, {})
    assert (defaults.listen_host, defaults.listen_port) == ("0.0.0.0", 5000)
    assert defaults.default_upstream is None


def test_sample_config_loads() -> None:
    cfg = load_config(SAMPLE, {})
    assert cfg.default_upstream == "docker.io"
    assert {"docker.io", "quay.io", "ghcr.io", "registry.k8s.io"} <= set(cfg.upstreams)
    assert cfg.upstreams["docker.io"].tag_ttl == 600.0
    assert cfg.upstreams["docker.io"].url == "https://registry-1.docker.io"


# --- problems ----------------------------------------------------------------------------


def test_many_problems_at_once_each_with_its_key_path() -> None:
    data = {
        "listen": "nonsense",
        "upstreams": {
            "quay.io": {"url": "https://quay.io", "bogus": 1},
            "docker.io": {"url": "ftp://registry-1.docker.io"},
            "ghcr.io": {},
            "a.example": {"url": "https://a.example", "username": "u",
                          "password_env": UNSET_VAR},
            "b.example": {"url": "https://b.example", "username": "u", "password": "x",
                          "password_env": "SET_VAR"},
            "c.example": {"url": "https://c.example/v2/"},
        },
        "default_upstream": "nope.io",
        "workers": 0,
        "shutdown_grace": "soon",
        "log": {"level": "loud"},
        "surprise": True,
    }
    problems = _problems(data, {"SET_VAR": "y"})
    expected_prefixes = [
        "listen: ",
        "upstreams.quay.io.bogus: unknown key",
        "upstreams.docker.io.url: expected an http(s) URL",
        "upstreams.ghcr.io.url: is required",
        f"upstreams.a.example.password_env: environment variable {UNSET_VAR} is not set",
        "upstreams.b.example.password_env: only one of password, password_env may be set",
        "upstreams.c.example.url: must be a bare origin",
        "default_upstream: 'nope.io' is not one of the configured upstreams",
        "workers: must be between 1 and 64",
        "shutdown_grace: invalid duration",
        "log.level: expected one of",
        "surprise: unknown key",
    ]
    for prefix in expected_prefixes:
        assert any(p.startswith(prefix) for p in problems), (prefix, problems)
    # The whole exception message lists every problem too.
    with pytest.raises(ConfigError) as exc_info:
        parse_config(data, {"SET_VAR": "y"})
    assert "upstreams.quay.io.bogus" in str(exc_info.value)


def test_conflicting_password_sources_report_no_spurious_unknown_key() -> None:
    data = {"upstreams": {"b.example": {"url": "https://b.example", "username": "u",
                                        "password": "x", "password_env": "SET_VAR"}}}
    problems = _problems(data, {"SET_VAR": "y"})
    assert problems == [
        "upstreams.b.example.password_env: only one of password, password_env may be set"]


def test_no_upstreams_is_a_problem() -> None:
    assert _problems({"listen": ":5000"}) == ["upstreams: at least one upstream is required"]


def test_root_not_a_mapping() -> None:
    problems = _problems(["a", "b"])
    assert problems[0] == "(root): expected a mapping, got list"


@pytest.mark.parametrize("listen", ["nonsense", "host:99999", "host:", "host:http"])
def test_bad_listen(listen: str) -> None:
    problems = _problems({"listen": listen, "upstreams": {"quay.io": {"url": "https://quay.io"}}})
    assert problems == [f"listen: expected HOST:PORT, got {listen!r}"]


@pytest.mark.parametrize("name", ["Quay.IO", "quay", "registry-1.docker.io"])
def test_bad_upstream_names(name: str) -> None:
    problems = _problems({"upstreams": {name: {"url": "https://x.example"}}})
    assert any(p.startswith(f"upstreams.{name}: ") for p in problems), problems


def test_password_without_username() -> None:
    problems = _problems({"upstreams": {"quay.io": {"url": "https://quay.io",
                                                    "password": "pw"}}})
    assert problems == ["upstreams.quay.io.username: is required when a password is set"]


def test_unreadable_password_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    problems = _problems({"upstreams": {"quay.io": {
        "url": "https://quay.io", "username": "u", "password_file": str(missing)}}})
    assert problems == ["upstreams.quay.io.password_file: cannot read file: "
                        "No such file or directory"]


def test_load_config_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc_info:
        load_config(tmp_path / "missing.yaml", {})
    assert exc_info.value.problems == [f"{tmp_path / 'missing.yaml'}: cannot read: "
                                       "No such file or directory"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("upstreams: [unclosed\n")
    with pytest.raises(ConfigError) as exc_info:
        load_config(bad, {})
    assert exc_info.value.problems[0].startswith(f"{bad}: invalid YAML")


# --- secrets never shown -----------------------------------------------------------------


def test_password_not_in_repr(tmp_path: Path) -> None:
    secret_env, secret_inline = "env-S3CRET-value", "inline-S3CRET-value"
    data = _full(tmp_path)
    data["upstreams"]["ghcr.io"] = {"url": "https://ghcr.io", "username": "u",
                                    "password": secret_inline}
    cfg = parse_config(data, {"HUB_TOKEN": secret_env})
    assert cfg.upstreams["ghcr.io"].password == secret_inline
    for text in (repr(cfg), str(cfg), repr(cfg.upstreams), repr(cfg.upstreams["docker.io"])):
        assert secret_env not in text
        assert secret_inline not in text
        assert "from-a-file" not in text
    assert "hubuser" in repr(cfg)  # the username is fine to show


def test_credentials_in_upstream_url_are_refused_or_hidden() -> None:
    data = {"upstreams": {"quay.io": {"url": "https://robot:hunter2pw@quay.io"}}}
    try:
        cfg = parse_config(data, {})
    except ConfigError as exc:
        assert any(p.startswith("upstreams.quay.io.url: ") for p in exc.problems)
        return
    assert "hunter2pw" not in repr(cfg)


# --- the CLI -----------------------------------------------------------------------------


def test_check_config_cli_reports_every_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(UNSET_VAR, raising=False)
    path = tmp_path / "bad.yaml"
    path.write_text(
        "listen: nowhere\n"
        "upstreams:\n"
        "  quay.io:\n"
        "    url: https://quay.io\n"
        "    bogus: 1\n"
        "  docker.io:\n"
        "    url: not-a-url\n"
        "  ghcr.io:\n"
        "    username: u\n"
        f"    password_env: {UNSET_VAR}\n"
        "default_upstream: gcr.io\n"
    )
    assert main(["check-config", str(path)]) == 1
    out = capsys.readouterr().out.splitlines()
    expected = [
        "listen: expected HOST:PORT, got 'nowhere'",
        "upstreams.quay.io.bogus: unknown key",
        "upstreams.docker.io.url: expected an http(s) URL, got 'not-a-url'",
        "upstreams.ghcr.io.url: is required",
        f"upstreams.ghcr.io.password_env: environment variable {UNSET_VAR} is not set",
        "default_upstream: 'gcr.io' is not one of the configured upstreams",
    ]
    for line in expected:
        assert line in out, (line, out)
    assert len(out) == len(expected)


def test_check_config_cli_ok_for_sample(capsys: pytest.CaptureFixture[str]) -> None:
    count = len(load_config(SAMPLE, {}).upstreams)
    assert main(["check-config", str(SAMPLE)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"ok: {count} upstreams (")
    assert "docker.io" in out and "listening on 127.0.0.1:5000" in out


def test_check_config_cli_missing_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check-config", str(tmp_path / "nope.yaml")]) == 1
    assert "cannot read" in capsys.readouterr().out


def test_bare_ipv6_listen_without_port_is_refused() -> None:
    problems = _problems({"listen": "::1", "upstreams": {"quay.io": {"url": "https://quay.io"}}})
    assert len(problems) == 1
    assert problems[0].startswith("listen: ") and "'::1'" in problems[0]


def test_nan_duration_is_refused() -> None:
    with pytest.raises(ValueError):
        parse_duration(float("nan"))


def test_upstream_deadline_pool_and_realm_keys() -> None:
    base = {"storage": {"filesystem": {"path": "/tmp/x"}}}
    cfg = parse_config({**base, "upstreams": {"quay.io": {
        "url": "https://quay.io", "request_timeout": "90s", "max_connections": 8,
        "pool_timeout": "5s", "token_realms": ["auth.corp.example", "https://sso.example/t"],
    }}}, {})
    quay = cfg.upstreams["quay.io"]
    assert (quay.request_timeout, quay.max_connections, quay.pool_timeout) == (90.0, 8, 5.0)
    assert quay.token_realms == ("auth.corp.example", "https://sso.example/t")
    hub = parse_config({**base, "upstreams": {"docker.io": {
        "url": "https://registry-1.docker.io"}}}, {}).upstreams["docker.io"]
    assert (hub.request_timeout, hub.max_connections, hub.pool_timeout) == (60.0, 100, 30.0)
    assert hub.token_realms == ()
    problems = _problems({**base, "upstreams": {"quay.io": {
        "url": "https://quay.io", "request_timeout": 0, "max_connections": 0,
        "read_timeout": 0, "token_realms": ["ftp://x", "not a host"]}}})
    assert problems == [
        "upstreams.quay.io.max_connections: must be between 1 and 10000",
        "upstreams.quay.io.token_realms: expected a host or an http(s) URL, got 'ftp://x'",
        "upstreams.quay.io.token_realms: expected a host or an http(s) URL, got 'not a host'",
        "upstreams.quay.io.request_timeout: must be more than 0",
        "upstreams.quay.io.read_timeout: must be more than 0",
    ]


def test_limits_section() -> None:
    ups = {"docker.io": {"url": "https://registry-1.docker.io"}}
    cfg = parse_config({"upstreams": ups}, {})
    assert (cfg.limits.max_connections, cfg.limits.max_connections_per_client,
            cfg.limits.send_timeout) == (4096, 512, 60.0)
    cfg = parse_config({"upstreams": ups, "limits": {"max_connections": 0,
                                                    "max_connections_per_client": 8,
                                                    "send_timeout": "2m"}}, {})
    assert (cfg.limits.max_connections, cfg.limits.max_connections_per_client,
            cfg.limits.send_timeout) == (0, 8, 120.0)
    assert _problems({"upstreams": ups, "limits": {"max_connections": -1, "send_timeout": 0.5,
                                                   "nope": 1}}) == [
        "limits.max_connections: must be between 0 and 1000000",
        "limits.send_timeout: must be at least 1s (or 0 to disable)",
        "limits.nope: unknown key",
    ]


def test_storage_drop_behind_defaults_on_and_takes_a_boolean(tmp_path: Path) -> None:
    base: dict[str, Any] = {"storage": {"filesystem": {"path": str(tmp_path)}},
                            "upstreams": {"quay.io": {"url": "https://quay.io"}}}
    assert parse_config(base, {}).storage.drop_behind is True
    off = {**base, "storage": {**base["storage"], "drop_behind": False}}
    assert parse_config(off, {}).storage.drop_behind is False
    bad = {**base, "storage": {**base["storage"], "drop_behind": "sometimes"}}
    with pytest.raises(ConfigError, match=r"storage\.drop_behind"):
        parse_config(bad, {})
