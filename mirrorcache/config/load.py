"""Typed configuration, read once from YAML and the environment.

``load_config(path, environ)`` is the only place that reads the config file or the
environment; every problem is collected with its key path (``upstreams.quay.io.url: ...``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

from mirrorcache.auth.credentials import parse_htpasswd, parse_tokens
from mirrorcache.config._section import _MISSING as _REQUIRED
from mirrorcache.config._section import _Section
from mirrorcache.config.model import (
    S3_MIN_PART_SIZE,
    AuthConfig,
    ClusterConfig,
    Config,
    EcrConfig,
    FilesystemStorageConfig,
    LifecycleConfig,
    LimitsConfig,
    LogConfig,
    MiB,
    PolicyConfig,
    RetentionConfig,
    S3LocalCacheConfig,
    S3StorageConfig,
    SizeLimits,
    StorageConfig,
    TlsConfig,
    UpstreamConfig,
)
from mirrorcache.config.secrets import read_credentials, read_secret
from mirrorcache.policy import Policy, load_policy_file, parse_policy
from mirrorcache.upstream.dockerhub import DOCKER_HUB_ALIASES
from mirrorcache.yamlfile import ConfigError, read_yaml_file


def parse_listen(value: str) -> tuple[str, int]:
    """Split ``host:port`` / ``[::1]:port`` / ``:port``."""
    host, sep, port = value.rpartition(":")
    if not sep or not re.fullmatch(r"[0-9]{1,5}", port) or not 0 <= int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise ValueError(f"write IPv6 addresses in brackets, e.g. [::1]:5000, got {value!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


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


_S3_SSE = ("AES256", "aws:kms")
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


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
    part_size = sec.size("part_size", 16 * MiB) or 16 * MiB
    if part_size < S3_MIN_PART_SIZE:
        sec.problem("part_size", "must be at least 5MiB (S3's smallest part)")
    elif part_size > 5 * (1 << 30):
        sec.problem("part_size", "must be at most 5GiB (S3's largest part)")
    local: S3LocalCacheConfig | None = None
    if sec.has("local_cache"):
        lsec = sec.section("local_cache")
        lpath = lsec.text("path")
        max_size = lsec.size("max_size", None)
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
        stale_upload_age=sec.duration("stale_upload_age", 3600.0),
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
    registry_id = sec.text("registry_id", m.group("registry_id") if m else _REQUIRED)
    if isinstance(registry_id, str) and not re.fullmatch(r"[0-9]{12}", registry_id):
        sec.problem("registry_id", "expected a 12-digit AWS account id")
    region = sec.text("region", m.group("region") if m else _REQUIRED)
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
    password = read_secret(sec, environ)
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
    for key in ("request_timeout", "read_timeout"):
        if getattr(up, key) <= 0:
            sec.problem(key, "must be more than 0")
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


def _parse_auth(sec: _Section, environ: Mapping[str, str]) -> AuthConfig:
    enabled = sec.flag("enabled", False)
    users: dict[str, str] = {}
    tokens: dict[str, str] = {}
    text = read_credentials(sec, "htpasswd", environ)
    if text is not None:
        users = parse_htpasswd(text, sec.key("htpasswd"), sec.problems)
    for name in ("tokens_file", "tokens_env"):
        text = read_credentials(sec, name, environ)
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


def _parse_limits(sec: _Section) -> LimitsConfig:
    cfg = LimitsConfig(
        max_connections=sec.integer("max_connections", 4096, 0, 1_000_000),
        max_connections_per_client=sec.integer("max_connections_per_client", 512, 0,
                                               1_000_000),
        send_timeout=sec.duration("send_timeout", 60.0),
    )
    if 0 < cfg.send_timeout < 1:
        sec.problem("send_timeout", "must be at least 1s (or 0 to disable)")
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


def parse_size_limits(sec: _Section) -> SizeLimits:
    """``max_size``, ``high_watermark``, ``low_watermark``, ``min_free`` of one cache tier
    (``storage``; the S3 backend's local tier reads the same keys in its own section)."""
    cfg = SizeLimits(
        max_size=sec.size("max_size", None),
        high_watermark=sec.fraction("high_watermark", 0.9),
        low_watermark=sec.fraction("low_watermark", 0.8),
        min_free=sec.size("min_free", 0) or 0,
    )
    if cfg.low_watermark > cfg.high_watermark:
        sec.problem("low_watermark", "must not be above high_watermark")
    if cfg.max_size == 0:
        sec.problem("max_size", "must be more than 0 (leave it out for no limit)")
    return cfg


def _parse_pins(sec: _Section) -> tuple[str, ...]:
    from mirrorcache.lifecycle.pins import parse_pin

    pins = sec.str_list("pins")
    for pin in pins:
        try:
            parse_pin(pin)
        except ValueError as exc:
            sec.problem("pins", str(exc))
    return pins


def _parse_lifecycle(root: _Section) -> tuple[RetentionConfig, LifecycleConfig]:
    ret_sec = root.section("retention")
    unused = ret_sec.raw("unused_for", None)
    retention = RetentionConfig(None if unused is None else ret_sec.duration("unused_for", 0.0))
    if retention.unused_for is not None and retention.unused_for <= 0:
        ret_sec.problem("unused_for", "must be more than 0 (leave it out to keep everything)")
    ret_sec.finish()
    sec = root.section("lifecycle")
    lc = LifecycleConfig(
        sweep_interval=sec.duration("sweep_interval", 300.0),
        flush_interval=sec.duration("flush_interval", 10.0),
        protect_recent=sec.duration("protect_recent", 120.0),
    )
    if lc.sweep_interval <= 0 or lc.flush_interval <= 0:
        sec.problem("sweep_interval" if lc.sweep_interval <= 0 else "flush_interval",
                    "must be more than 0")
    elif lc.protect_recent < lc.flush_interval:
        sec.problem("protect_recent", "must be at least flush_interval (a pull another "
                    "worker has not reported yet must stay protected)")
    sec.finish()
    return retention, lc


def _parse_cluster(sec: _Section, listen_host: str, listen_port: int,
                   environ: Mapping[str, str]) -> ClusterConfig:
    """``cluster``: peers (a list of host:port, or ``{dns: name:port}``), self, the secret."""
    raw = sec.raw("peers", None)
    peers: tuple[str, ...] = ()
    dns: str | None = None
    if isinstance(raw, dict):
        dsec = sec.section("peers")
        dns = dsec.text("dns")
        dsec.finish()
        if dns is not None:
            try:
                parse_listen(dns)
            except ValueError as exc:
                dsec.problem("dns", str(exc))
    elif raw is not None:
        peers = sec.str_list("peers")
        for peer in peers:
            try:
                host, _ = parse_listen(peer)
            except ValueError as exc:
                sec.problem("peers", str(exc))
                continue
            if host == "0.0.0.0":
                sec.problem("peers", f"{peer!r}: name the peer's host")
    default_self = ""
    if environ.get("POD_IP"):
        pod_ip = environ["POD_IP"]
        default_self = f"[{pod_ip}]:{listen_port}" if ":" in pod_ip else f"{pod_ip}:{listen_port}"
    elif listen_host not in ("0.0.0.0", "::"):
        default_self = (f"[{listen_host}]:{listen_port}" if ":" in listen_host
                        else f"{listen_host}:{listen_port}")
    self_address = sec.text("self", None) or default_self
    enabled = bool(peers or dns)
    if enabled and not self_address:
        sec.problem("self", "cannot tell this replica's address: set cluster.self, the "
                    "POD_IP environment variable, or a specific listen address")
    secret = ""
    file = sec.text("secret_file", None)
    if file is not None:
        try:
            secret = Path(file).read_text().strip()
        except OSError as exc:
            sec.problem("secret_file", f"cannot read file: {exc.strerror}")
        else:
            if len(secret) < 16:
                sec.problem("secret_file", "the secret must be at least 16 characters")
    elif enabled:
        sec.problem("secret_file", "is required when peers are set")
    cfg = ClusterConfig(
        peers=peers, dns=dns, self_address=self_address, secret=secret,
        secret_file=Path(file) if file else None,
        owner_first_byte_timeout=sec.duration("owner_first_byte_timeout", 5.0),
        peer_request_timeout=sec.duration("peer_request_timeout", 30.0),
        probe_interval=sec.duration("probe_interval", 2.0),
        dns_interval=sec.duration("dns_interval", 5.0),
    )
    for name in ("owner_first_byte_timeout", "peer_request_timeout", "probe_interval",
                 "dns_interval"):
        if getattr(cfg, name) <= 0:
            sec.problem(name, "must be more than 0")
    sec.finish()
    return cfg


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
    s3_cfg = _parse_s3(storage_sec.section("s3")) if storage_sec.has("s3") else None
    fs_cfg: FilesystemStorageConfig | None = None
    if s3_cfg is not None and storage_sec.has("filesystem"):
        storage_sec.problem("s3", "set exactly one of storage.filesystem and storage.s3")
    if s3_cfg is None or storage_sec.has("filesystem"):
        fs_sec = storage_sec.section("filesystem")
        fs_path = Path(fs_sec.text("path", "/var/lib/mirrorcache") or "/var/lib/mirrorcache")
        fs_sec.finish()
        fs_cfg = FilesystemStorageConfig(path=fs_path)
    meta = storage_sec.text("metadata_path", None)
    if isinstance(meta, str):
        meta_path = Path(meta)
    elif fs_cfg is not None:
        meta_path = fs_cfg.path / "metadata"
    elif s3_cfg is not None and s3_cfg.local_cache is not None:
        meta_path = s3_cfg.local_cache.path / "metadata"
    else:
        meta_path = Path("/var/lib/mirrorcache/metadata")
    storage = StorageConfig(
        filesystem=fs_cfg,
        metadata_path=meta_path,
        limits=parse_size_limits(storage_sec),
        s3=s3_cfg,
        drop_behind=storage_sec.flag("drop_behind", True),
    )
    if s3_cfg is not None and storage.limits.limited:
        storage_sec.problem("max_size", "with storage.s3 the bucket is not size-limited here; "
                            "bound the local tier with storage.s3.local_cache.max_size")
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
    retention_cfg, lifecycle_cfg = _parse_lifecycle(root)

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
        limits=_parse_limits(root.section("limits")),
        retention=retention_cfg,
        lifecycle=lifecycle_cfg,
        pins=_parse_pins(root),
        cluster=_parse_cluster(root.section("cluster"), host, port, environ),
    )
    root.finish()
    if problems:
        raise ConfigError(problems)
    return cfg


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate a YAML config file."""
    cfg = parse_config(read_yaml_file(path), environ)
    # Kept so SIGHUP can re-read the static peer list from the same file.
    return replace(cfg, cluster=replace(cfg.cluster, config_file=Path(path)))
