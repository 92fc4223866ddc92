"""Typed configuration, read once from YAML and the environment.

``load.py`` reads and validates (``load_config`` / ``parse_config``), ``model.py`` holds the
frozen dataclasses, ``_section.py`` the generic validator, ``secrets.py`` password and
credential reading. YAML file reading and ``ConfigError`` live below this package, in
``mirrorcache.yamlfile``, so ``policy`` can use them without importing config.
"""

from mirrorcache.config._section import parse_duration, parse_fraction, parse_size
from mirrorcache.config.load import (
    ECR_HOST_RE,
    load_config,
    parse_config,
    parse_listen,
)
from mirrorcache.config.model import (
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
from mirrorcache.yamlfile import ConfigError, read_yaml_file

__all__ = [
    "ECR_HOST_RE",
    "AuthConfig",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "EcrConfig",
    "FilesystemStorageConfig",
    "LifecycleConfig",
    "LimitsConfig",
    "LogConfig",
    "MiB",
    "PolicyConfig",
    "RetentionConfig",
    "S3LocalCacheConfig",
    "S3StorageConfig",
    "SizeLimits",
    "StorageConfig",
    "TlsConfig",
    "UpstreamConfig",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_fraction",
    "parse_listen",
    "parse_size",
    "read_yaml_file",
]
