"""The configuration as frozen dataclasses, one per section."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mirrorcache.policy import Policy
from mirrorcache.upstream.dockerhub import is_docker_hub


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
        return is_docker_hub(self.name)


@dataclass(frozen=True)
class FilesystemStorageConfig:
    """Blobs and manifests in a content-addressed tree under ``path``."""

    path: Path


@dataclass(frozen=True)
class SizeLimits:
    """How large a cache tier may grow: evict from ``high_watermark`` of ``max_size`` down to
    ``low_watermark``; keep ``min_free`` bytes free on the filesystem (0 / None: no limit)."""

    max_size: int | None = None
    high_watermark: float = 0.9
    low_watermark: float = 0.8
    min_free: int = 0

    @property
    def limited(self) -> bool:
        return self.max_size is not None or self.min_free > 0


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
    #: Multipart uploads older than this are a crashed process's leftovers (the janitor).
    stale_upload_age: float = 3600.0


@dataclass(frozen=True)
class StorageConfig:
    """Where cached content and metadata live: exactly one of ``filesystem`` and ``s3``."""

    filesystem: FilesystemStorageConfig | None
    metadata_path: Path
    limits: SizeLimits = SizeLimits()
    s3: S3StorageConfig | None = None
    #: A large blob being fetched keeps only its last stretch in the page cache (behind its
    #: slowest reader): the cold path reuses a few MiB of memory instead of filling fresh
    #: page cache, which costs far more CPU (on VMs above all). False: the whole blob stays
    #: cached in memory after its fetch, as the kernel likes.
    drop_behind: bool = True

    @property
    def local_root(self) -> Path:
        """This host's working directory: the filesystem store's root, the S3 local tier's
        path, or (S3 without a tier) the directory holding ``metadata_path``. Spools and
        claim files live under it."""
        if self.filesystem is not None:
            return self.filesystem.path
        if self.s3 is not None and self.s3.local_cache is not None:
            return self.s3.local_cache.path
        return self.metadata_path.parent

    @property
    def fs_path(self) -> Path:
        """The filesystem backend's root (raise if the backend is S3: say so to the user)."""
        if self.filesystem is None:
            raise ValueError("this needs the filesystem storage backend (storage.s3 is set)")
        return self.filesystem.path


@dataclass(frozen=True)
class RetentionConfig:
    """Evict what nobody pulled for ``unused_for`` seconds, even under the size limit."""

    unused_for: float | None = None


@dataclass(frozen=True)
class LifecycleConfig:
    """The background sweeper and the access-time flush."""

    sweep_interval: float = 300.0
    #: Each process writes its batched pull counts and times this often (and at shutdown).
    flush_interval: float = 10.0
    #: Content pulled this recently is never evicted (it may be mid-pull in some worker).
    protect_recent: float = 120.0


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
class LimitsConfig:
    """Client connection caps (0: none) and the send timeout for clients that stop reading."""

    max_connections: int = 4096
    max_connections_per_client: int = 512
    send_timeout: float = 60.0


@dataclass(frozen=True)
class TlsConfig:
    """Serve HTTPS with this certificate chain and key."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class ClusterConfig:
    """Replicas acting as one cache: who the members are and how they talk.

    ``peers`` is a static list of ``host:port`` (``dns`` empty), or one ``name:port`` whose
    addresses are re-resolved every ``dns_interval`` (a headless Service). ``self_address``
    is this replica's own ``host:port`` as the others see it.
    """

    peers: tuple[str, ...] = ()
    dns: str | None = None
    self_address: str = ""
    secret: str = field(default="", repr=False)
    secret_file: Path | None = None
    owner_first_byte_timeout: float = 5.0
    peer_request_timeout: float = 30.0
    probe_interval: float = 2.0
    dns_interval: float = 5.0
    #: The file this config came from (SIGHUP re-reads ``cluster.peers`` from it).
    config_file: Path | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.peers or self.dns)


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
    limits: LimitsConfig = LimitsConfig()
    retention: RetentionConfig = RetentionConfig()
    lifecycle: LifecycleConfig = LifecycleConfig()
    #: Image references and globs (``docker.io/library/python:3.12*``) never evicted.
    pins: tuple[str, ...] = ()
    cluster: ClusterConfig = ClusterConfig()
