"""Typed configuration, read once from YAML and the environment.

``load_config(path, environ)`` is the only place that reads the config file or the
environment; every problem is collected with its key path (``upstreams.quay.io.url: ...``).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from mirrorcache.auth.credentials import parse_htpasswd, parse_tokens
from mirrorcache.policy import Policy, load_policy_file, parse_policy

_MISSING: Any = object()
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


class ConfigError(Exception):
    """A config that cannot be used; ``problems`` holds one line per problem with its key path."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  {p}" for p in problems))


def parse_duration(value: object) -> float:
    """Seconds from ``30``, ``"45s"``, ``"10m"``, ``"1h30m"``, ``"500ms"``."""
    if isinstance(value, bool):
        raise ValueError("expected a duration")
    if isinstance(value, int | float):
        if not math.isfinite(value) or value < 0:
            raise ValueError("must be a finite, non-negative number of seconds")
        return float(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected a duration such as 30s, 10m or 1h")
    text = value.strip()
    total, pos = 0.0, 0
    for m in re.finditer(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)", text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(text) or pos == 0:
        raise ValueError(f"invalid duration {value!r} (use e.g. 30s, 10m, 1h)")
    return total


class _Section:
    """Reads one mapping of the raw config, remembering its key path and every problem."""

    def __init__(self, data: object, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        self.used: set[str] = set()
        if data is None:
            data = {}
        if not isinstance(data, dict):
            self.problem("", f"expected a mapping, got {type(data).__name__}")
            data = {}
        self.data: dict[str, Any] = data

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def problem(self, name: str, message: str) -> None:
        where = self.key(name) if name else (self.path or "(root)")
        self.problems.append(f"{where}: {message}")

    def has(self, name: str) -> bool:
        return name in self.data

    def raw(self, name: str, default: Any = _MISSING) -> Any:
        self.used.add(name)
        if name not in self.data or self.data[name] is None:
            if default is _MISSING:
                self.problem(name, "is required")
                return None
            return default
        return self.data[name]

    def text(self, name: str, default: Any = _MISSING) -> Any:
        value = self.raw(name, default)
        if value is None or value is default:
            return value
        if not isinstance(value, str) or not value:
            self.problem(name, "expected a non-empty string")
            return default if default is not _MISSING else None
        return value

    def flag(self, name: str, default: bool) -> bool:
        value = self.raw(name, default)
        if not isinstance(value, bool):
            self.problem(name, "expected true or false")
            return default
        return value

    def integer(self, name: str, default: int, minimum: int = 0, maximum: int = 1 << 31) -> int:
        value = self.raw(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            self.problem(name, "expected an integer")
            return default
        if not minimum <= value <= maximum:
            self.problem(name, f"must be between {minimum} and {maximum}")
            return default
        return value

    def duration(self, name: str, default: float) -> float:
        value = self.raw(name, default)
        try:
            return parse_duration(value)
        except ValueError as exc:
            self.problem(name, str(exc))
            return default

    def str_list(self, name: str) -> tuple[str, ...]:
        value = self.raw(name, [])
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            self.problem(name, "expected a list of strings")
            return ()
        return tuple(value)

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.raw(name, default)
        if value not in choices:
            self.problem(name, f"expected one of {', '.join(choices)}")
            return default
        return str(value)

    def section(self, name: str) -> _Section:
        self.used.add(name)
        return _Section(self.data.get(name), self.key(name), self.problems)

    def items(self) -> Iterator[tuple[str, _Section]]:
        for name in self.data:
            self.used.add(name)
            yield name, _Section(self.data[name], self.key(name), self.problems)

    def finish(self) -> None:
        for name in self.data:
            if name not in self.used:
                self.problem(name, "unknown key")


@dataclass(frozen=True)
class EcrConfig:
    """An Amazon ECR upstream: whose registry, where, and (tests) which endpoint.

    Credentials come from aiobotocore's default chain, optionally the named ``profile``.
    """

    registry_id: str
    region: str
    endpoint_url: str | None = None
    profile: str | None = None


@dataclass(frozen=True)
class UpstreamConfig:
    """One upstream registry: where it is, how to log in, how long its tags are trusted."""

    name: str
    url: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tag_ttl: float = 600.0
    tag_stale_while_revalidate: float = 0.0
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    ca_file: str | None = None
    insecure: bool = False
    offline: bool = False
    max_retries: int = 3
    retry_max_wait: float = 30.0
    breaker_failures: int = 5
    breaker_cooldown: float = 30.0
    #: Overall deadline of one exchange (token, manifest, tags, referrers, error body; for
    #: blobs: until the response headers, the body then only has ``read_timeout`` per read).
    request_timeout: float = 60.0
    #: Requests in flight to this upstream at once (each holds one connection).
    max_connections: int = 100
    #: How long a request waits for one of those slots; not an upstream failure.
    pool_timeout: float = 30.0
    #: Token realms besides the upstream's own domain that may receive its credentials.
    token_realms: tuple[str, ...] = ()
    #: ``registry`` (username/password or anonymous) or ``ecr`` (GetAuthorizationToken).
    type: str = "registry"
    ecr: EcrConfig | None = None

    @property
    def is_docker_hub(self) -> bool:
        return self.name == "docker.io"


@dataclass(frozen=True)
class FilesystemStorageConfig:
    """Blobs and manifests in a content-addressed tree under ``path``."""

    path: Path


MiB = 1 << 20
#: S3's smallest part (all but the last part of a multipart upload).
S3_MIN_PART_SIZE = 5 * MiB


@dataclass(frozen=True)
class S3LocalCacheConfig:
    """A bounded local disk tier in front of S3 (hot blobs go out with sendfile)."""

    path: Path
    max_size: int


@dataclass(frozen=True)
class S3StorageConfig:
    """Blobs, tag records and repository links in an S3 bucket (keys: storage/keys.py).

    Credentials come only from aiobotocore's default chain (environment, shared files, web
    identity / IRSA, instance role), optionally from the named ``profile``.
    """

    bucket: str
    prefix: str = ""
    region: str | None = None
    endpoint_url: str | None = None
    addressing_style: str = "auto"
    sse: str | None = None
    kms_key_id: str | None = None
    storage_class: str | None = None
    profile: str | None = None
    part_size: int = 16 * MiB
    max_parallel_parts: int = 4
    redirect: bool = False
    redirect_expiry: float = 300.0
    local_cache: S3LocalCacheConfig | None = None
    #: How long a replica trusts its in-memory copy of a tag record or link.
    metadata_ttl: float = 5.0


@dataclass(frozen=True)
class StorageConfig:
    """Where cached content and metadata live (``s3`` set: the S3 backend, not ``filesystem``)."""

    filesystem: FilesystemStorageConfig
    metadata_path: Path
    s3: S3StorageConfig | None = None


@dataclass(frozen=True)
class LogConfig:
    """Log level and rendering (``auto``: console on a TTY, JSON otherwise)."""

    level: str = "info"
    format: str = "auto"


@dataclass(frozen=True)
class PolicyConfig:
    """Which repositories may be pulled: inline rules, or rules from ``file`` (reloadable)."""

    policy: Policy = field(default_factory=Policy)
    file: Path | None = None
    reload_interval: float = 2.0


@dataclass(frozen=True)
class AuthConfig:
    """Client authentication (off: anonymous read). Secrets are read once, at load time."""

    enabled: bool = False
    realm: str = "mirrorcache"
    users: Mapping[str, str] = field(default_factory=dict, repr=False)
    tokens: Mapping[str, str] = field(default_factory=dict, repr=False)
    groups: Mapping[str, frozenset[str]] = field(default_factory=dict)
    max_failed_logins: int = 10
    failed_login_window: float = 60.0


@dataclass(frozen=True)
class TlsConfig:
    """Serve HTTPS with this certificate chain and key."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Config:
    """The whole mirrorcache configuration."""

    listen_host: str
    listen_port: int
    storage: StorageConfig
    upstreams: Mapping[str, UpstreamConfig]
    default_upstream: str | None
    log: LogConfig = LogConfig()
    workers: int = 1
    event_loop: str = "asyncio"
    shutdown_grace: float = 30.0
    policy: PolicyConfig = PolicyConfig()
    auth: AuthConfig = AuthConfig()
    tls: TlsConfig | None = None


DOCKER_HUB_ALIASES = ("registry-1.docker.io", "index.docker.io", "registry.hub.docker.com")


def parse_listen(value: str) -> tuple[str, int]:
    """Split ``host:port`` / ``[::1]:port`` / ``:port``."""
    host, sep, port = value.rpartition(":")
    if not sep or not re.fullmatch(r"[0-9]{1,5}", port) or not 0 <= int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise ValueError(f"write IPv6 addresses in brackets, e.g. [::1]:5000, got {value!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def _read_secret(sec: _Section, environ: Mapping[str, str]) -> str | None:
    sources = [k for k in ("password", "password_env", "password_file") if sec.has(k)]
    if len(sources) > 1:
        for k in sources:
            sec.raw(k, None)  # all read, so none is also reported as an unknown key
        sec.problem(sources[1], f"only one of {', '.join(sources)} may be set")
        return None
    if sec.has("password_env"):
        var = sec.text("password_env")
        if var is not None and var not in environ:
            sec.problem("password_env", f"environment variable {var} is not set")
            return None
        return environ.get(var) if var else None
    if sec.has("password_file"):
        path = sec.text("password_file")
        try:
            return Path(path).read_text().strip() if path else None
        except OSError as exc:
            sec.problem("password_file", f"cannot read file: {exc.strerror}")
            return None
    value = sec.text("password", None)
    return value if isinstance(value, str) else None


def _token_realms(sec: _Section) -> tuple[str, ...]:
    """``token_realms``: hosts (``auth.example.com``) or URL prefixes
    (``https://auth.example.com/token``) trusted with this upstream's credentials."""
    realms = sec.str_list("token_realms")
    for entry in realms:
        if "://" in entry:
            parts = urlsplit(entry)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                sec.problem("token_realms", f"expected a host or an http(s) URL, got {entry!r}")
        elif not re.fullmatch(r"[A-Za-z0-9.-]+(:\d+)?|\[[0-9A-Fa-f:.]+\](:\d+)?", entry):
            sec.problem("token_realms", f"expected a host or an http(s) URL, got {entry!r}")
    return realms


_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2,
               "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4, "kib": 1 << 10,
               "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_size(value: object) -> int:
    """Bytes from ``1048576``, ``"512MiB"``, ``"10GiB"``, ``"2GB"``."""
    if isinstance(value, bool):
        raise ValueError("expected a size")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must not be negative")
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", value) if isinstance(
        value, str) else None
    if m is None or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"invalid size {value!r} (use e.g. 512MiB, 10GiB)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


_S3_SSE = ("AES256", "aws:kms")
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def _size(sec: _Section, name: str, default: int | None) -> int | None:
    value = sec.raw(name, default)
    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as exc:
        sec.problem(name, str(exc))
        return default


def _parse_s3(sec: _Section) -> S3StorageConfig:
    """``storage.s3``: bucket, prefix, region, endpoint, SSE, parts, redirect, local tier.
    No credentials here: aiobotocore's default chain (plus an optional ``profile``)."""
    bucket = sec.text("bucket")
    if isinstance(bucket, str) and not _BUCKET_RE.fullmatch(bucket):
        sec.problem("bucket", f"not a valid S3 bucket name: {bucket!r}")
    endpoint = sec.text("endpoint_url", None)
    if isinstance(endpoint, str):
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            sec.problem("endpoint_url", f"expected an http(s) URL, got {endpoint!r}")
    prefix = sec.raw("prefix", "")
    if not isinstance(prefix, str):
        sec.problem("prefix", "expected a string")
        prefix = ""
    sse = sec.raw("sse", None)
    if sse is not None and sse not in _S3_SSE:
        sec.problem("sse", f"expected one of {', '.join(_S3_SSE)}")
        sse = None
    kms = sec.text("kms_key_id", None)
    if kms is not None and sse != "aws:kms":
        sec.problem("kms_key_id", "only with sse: aws:kms")
    for secret in ("access_key_id", "secret_access_key", "session_token", "aws_access_key_id",
                   "aws_secret_access_key"):
        if sec.has(secret):
            sec.raw(secret, None)
            sec.problem(secret, "no credentials in the config: use the AWS default chain "
                        "(environment, shared files, web identity, instance role) or profile")
    part_size = _size(sec, "part_size", 16 * MiB) or 16 * MiB
    if part_size < S3_MIN_PART_SIZE:
        sec.problem("part_size", "must be at least 5MiB (S3's smallest part)")
    elif part_size > 5 * (1 << 30):
        sec.problem("part_size", "must be at most 5GiB (S3's largest part)")
    local: S3LocalCacheConfig | None = None
    if sec.has("local_cache"):
        lsec = sec.section("local_cache")
        lpath = lsec.text("path")
        max_size = _size(lsec, "max_size", None)
        if max_size is None and not lsec.has("max_size"):
            lsec.problem("max_size", "is required")
        lsec.finish()
        local = S3LocalCacheConfig(Path(lpath or "."), max_size or 0)
    cfg = S3StorageConfig(
        bucket=bucket or "",
        prefix=prefix,
        region=sec.text("region", None),
        endpoint_url=endpoint,
        addressing_style=sec.choice("addressing_style", "auto", ("auto", "virtual", "path")),
        sse=sse,
        kms_key_id=kms,
        storage_class=sec.text("storage_class", None),
        profile=sec.text("profile", None),
        part_size=part_size,
        max_parallel_parts=sec.integer("max_parallel_parts", 4, 1, 32),
        redirect=sec.flag("redirect", False),
        redirect_expiry=sec.duration("redirect_expiry", 300.0),
        local_cache=local,
        metadata_ttl=sec.duration("metadata_ttl", 5.0),
    )
    if cfg.redirect and not 1 <= cfg.redirect_expiry <= 7 * 86400:
        sec.problem("redirect_expiry", "must be between 1s and 7d (presigned URL lifetime)")
    sec.finish()
    return cfg


#: An ECR registry host: ``<account>.dkr.ecr.<region>.amazonaws.com``.
ECR_HOST_RE = re.compile(
    r"(?P<registry_id>[0-9]{12})\.dkr\.ecr(?:-fips)?\.(?P<region>[a-z]{2}(?:-[a-z]+)+-[0-9])"
    r"\.amazonaws\.com(?:\.cn)?")


def _parse_ecr(sec: _Section, url: object, has_password: bool) -> EcrConfig | None:
    """``type: ecr`` with ``registry_id``, ``region``, ``endpoint_url``, ``profile``; a URL
    on ``<id>.dkr.ecr.<region>.amazonaws.com`` implies it (and supplies id and region)."""
    host = (urlsplit(url).hostname or "") if isinstance(url, str) else ""
    m = ECR_HOST_RE.fullmatch(host.lower())
    kind = sec.choice("type", "ecr" if m else "registry", ("registry", "ecr"))
    ecr_keys = ("registry_id", "region", "endpoint_url", "profile")
    if kind != "ecr":
        for key in ecr_keys:
            if sec.has(key):
                sec.raw(key, None)
                sec.problem(key, "only for type: ecr")
        return None
    if has_password:
        sec.problem("type", "an ECR upstream gets its credentials from GetAuthorizationToken: "
                    "remove username/password")
    registry_id = sec.text("registry_id", m.group("registry_id") if m else _MISSING)
    if isinstance(registry_id, str) and not re.fullmatch(r"[0-9]{12}", registry_id):
        sec.problem("registry_id", "expected a 12-digit AWS account id")
    region = sec.text("region", m.group("region") if m else _MISSING)
    endpoint = sec.text("endpoint_url", None)
    if isinstance(endpoint, str) and urlsplit(endpoint).scheme not in ("http", "https"):
        sec.problem("endpoint_url", f"expected an http(s) URL, got {endpoint!r}")
    return EcrConfig(registry_id=registry_id or "", region=region or "", endpoint_url=endpoint,
                     profile=sec.text("profile", None))


def _parse_upstream(name: str, sec: _Section, environ: Mapping[str, str]) -> UpstreamConfig:
    url = sec.text("url")
    if isinstance(url, str):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            sec.problem("url", f"expected an http(s) URL, got {url!r}")
        elif parts.path not in ("", "/") or parts.query:
            sec.problem("url", "must be a bare origin such as https://quay.io (no path)")
        elif parts.username is not None or parts.password is not None:
            sec.problem("url", "must not carry credentials: use username and password_env "
                        "or password_file")
    username = sec.text("username", None)
    password = _read_secret(sec, environ)
    if password is not None and username is None:
        sec.problem("username", "is required when a password is set")
    ecr = _parse_ecr(sec, url, username is not None or password is not None)
    ca_file = sec.text("ca_file", None)
    if isinstance(ca_file, str) and not Path(ca_file).is_file():
        sec.problem("ca_file", f"no such file: {ca_file}")
    up = UpstreamConfig(
        name=name,
        url=(url or "").rstrip("/"),
        username=username,
        password=password,
        tag_ttl=sec.duration("tag_ttl", 600.0),
        tag_stale_while_revalidate=sec.duration("tag_stale_while_revalidate", 0.0),
        connect_timeout=sec.duration("connect_timeout", 10.0),
        read_timeout=sec.duration("read_timeout", 60.0),
        ca_file=ca_file,
        insecure=sec.flag("insecure", False),
        offline=sec.flag("offline", False),
        max_retries=sec.integer("max_retries", 3, 0, 20),
        retry_max_wait=sec.duration("retry_max_wait", 30.0),
        breaker_failures=sec.integer("breaker_failures", 5, 1, 1000),
        breaker_cooldown=sec.duration("breaker_cooldown", 30.0),
        request_timeout=sec.duration("request_timeout", 60.0),
        max_connections=sec.integer("max_connections", 100, 1, 10000),
        pool_timeout=sec.duration("pool_timeout", 30.0),
        token_realms=_token_realms(sec),
        type="ecr" if ecr is not None else "registry",
        ecr=ecr,
    )
    if up.request_timeout <= 0:
        sec.problem("request_timeout", "must be more than 0")
    sec.finish()
    return up


def _parse_policy(sec: _Section) -> PolicyConfig:
    """``policy: {default, rules}`` inline, or ``policy: {file, reload_interval}``."""
    extra = ("file", "reload_interval")
    sec.used.update(("default", "rules", *extra))
    file = sec.text("file", None)
    interval = sec.duration("reload_interval", 2.0)
    if file is None:
        return PolicyConfig(parse_policy(sec.data, sec.path, sec.problems, extra_keys=extra),
                            None, interval)
    for name in ("rules", "default"):
        if sec.has(name):
            sec.problem(name, "set either policy.file or inline rules/default, not both")
    try:
        policy = load_policy_file(file)
    except ConfigError as exc:
        sec.problems.extend(f"{sec.key('file')}: {p}" for p in exc.problems)
        policy = Policy()
    return PolicyConfig(policy, Path(file), interval)


def _read_credentials(sec: _Section, name: str, environ: Mapping[str, str]) -> str | None:
    """Text of the file at ``sec[name]`` (or of the env var, for ``*_env`` keys)."""
    value = sec.text(name, None)
    if value is None:
        return None
    if name.endswith("_env"):
        if value not in environ:
            sec.problem(name, f"environment variable {value} is not set")
            return None
        return environ[value]
    try:
        return Path(value).read_text()
    except OSError as exc:
        sec.problem(name, f"cannot read file: {exc.strerror}")
        return None


def _parse_auth(sec: _Section, environ: Mapping[str, str]) -> AuthConfig:
    enabled = sec.flag("enabled", False)
    users: dict[str, str] = {}
    tokens: dict[str, str] = {}
    text = _read_credentials(sec, "htpasswd", environ)
    if text is not None:
        users = parse_htpasswd(text, sec.key("htpasswd"), sec.problems)
    for name in ("tokens_file", "tokens_env"):
        text = _read_credentials(sec, name, environ)
        if text is not None:
            tokens.update(parse_tokens(text, sec.key(name), sec.problems))
    groups: dict[str, frozenset[str]] = {}
    groups_sec = sec.section("groups")
    for group in list(groups_sec.data):
        groups[str(group)] = frozenset(groups_sec.str_list(group))
    if enabled and not users and not tokens:
        sec.problem("enabled", "no users: set htpasswd, tokens_file or tokens_env")
    cfg = AuthConfig(
        enabled=enabled,
        realm=sec.text("realm", "mirrorcache"),
        users=users,
        tokens=tokens,
        groups=groups,
        max_failed_logins=sec.integer("max_failed_logins", 10, 0, 1_000_000),
        failed_login_window=sec.duration("failed_login_window", 60.0),
    )
    if '"' in cfg.realm or "\\" in cfg.realm:
        sec.problem("realm", "must not contain quotes or backslashes")
    sec.finish()
    return cfg


def _parse_tls(sec: _Section) -> TlsConfig | None:
    if not sec.data:
        sec.finish()
        return None
    paths = {}
    for name in ("cert", "key"):
        value = sec.text(name)
        if isinstance(value, str) and not Path(value).is_file():
            sec.problem(name, f"no such file: {value}")
        paths[name] = Path(value or "")
    sec.finish()
    return TlsConfig(paths["cert"], paths["key"])


_UPSTREAM_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:\d+)?|localhost(:\d+)?")


def parse_config(data: object, environ: Mapping[str, str] | None = None) -> Config:
    """Validate raw (YAML-decoded) config data into a Config, or raise ConfigError."""
    environ = os.environ if environ is None else environ
    problems: list[str] = []
    root = _Section(data, "", problems)

    listen = root.text("listen", "0.0.0.0:5000")
    try:
        host, port = parse_listen(listen)
    except ValueError as exc:
        root.problem("listen", str(exc))
        host, port = "0.0.0.0", 5000

    storage_sec = root.section("storage")
    fs_sec = storage_sec.section("filesystem")
    fs_path = Path(fs_sec.text("path", "/var/lib/mirrorcache") or "/var/lib/mirrorcache")
    fs_sec.finish()
    meta = storage_sec.text("metadata_path", None)
    s3_cfg = _parse_s3(storage_sec.section("s3")) if storage_sec.has("s3") else None
    if s3_cfg is not None and storage_sec.has("filesystem"):
        storage_sec.problem("s3", "set exactly one of storage.filesystem and storage.s3")
    storage = StorageConfig(
        filesystem=FilesystemStorageConfig(path=fs_path),
        metadata_path=Path(meta) if isinstance(meta, str) else fs_path / "metadata",
        s3=s3_cfg,
    )
    storage_sec.finish()

    upstreams: dict[str, UpstreamConfig] = {}
    up_sec = root.section("upstreams")
    if not up_sec.data:
        up_sec.problem("", "at least one upstream is required")
    for name, sec in up_sec.items():
        if not _UPSTREAM_NAME_RE.fullmatch(name) or ("." not in name and ":" not in name
                                                     and name != "localhost"):
            up_sec.problem(name, "upstream names are registry hosts such as docker.io or quay.io")
        if name in DOCKER_HUB_ALIASES:
            up_sec.problem(name, "name Docker Hub 'docker.io'")
        upstreams[name] = _parse_upstream(name, sec, environ)

    default = root.text("default_upstream", None)
    if default is not None and default not in upstreams:
        root.problem("default_upstream", f"{default!r} is not one of the configured upstreams")

    log_sec = root.section("log")
    log_cfg = LogConfig(
        level=log_sec.choice("level", "info", ("debug", "info", "warning", "error")),
        format=log_sec.choice("format", "auto", ("auto", "json", "console")),
    )
    log_sec.finish()

    policy_cfg = _parse_policy(root.section("policy"))
    auth_cfg = _parse_auth(root.section("auth"), environ)
    if not auth_cfg.enabled:
        for rule in policy_cfg.policy.rules:
            if rule.users or rule.groups:
                root.problem("policy", f"{rule.text} names users or groups, but auth is not "
                             "enabled (every caller is anonymous)")
    tls_cfg = _parse_tls(root.section("tls"))

    cfg = Config(
        listen_host=host,
        listen_port=port,
        storage=storage,
        upstreams=upstreams,
        default_upstream=default,
        log=log_cfg,
        workers=root.integer("workers", 1, 1, 64),
        event_loop=root.choice("event_loop", "asyncio", ("asyncio", "uvloop")),
        shutdown_grace=root.duration("shutdown_grace", 30.0),
        policy=policy_cfg,
        auth=auth_cfg,
        tls=tls_cfg,
    )
    root.finish()
    if problems:
        raise ConfigError(problems)
    return cfg


def read_yaml_file(path: str | Path) -> Any:
    """The decoded YAML of a file, or ConfigError saying why it cannot be had."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: invalid YAML: {exc}"]) from None


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate a YAML config file."""
    return parse_config(read_yaml_file(path), environ)
