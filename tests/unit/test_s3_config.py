"""storage.s3 config: defaults, sizes, validation with key paths, exactly one backend."""

from __future__ import annotations

from pathlib import Path

import pytest

from mirrorcache.config import (
    ConfigError,
    MiB,
    S3LocalCacheConfig,
    S3StorageConfig,
    parse_config,
    parse_size,
)

UP = {"docker.io": {"url": "https://registry-1.docker.io"}}


def problems(storage: dict[str, object]) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse_config({"storage": storage, "upstreams": UP}, {})
    return err.value.problems


def test_s3_section() -> None:
    cfg = parse_config({"storage": {"s3": {
        "bucket": "my-cache", "prefix": "/mirror/", "region": "eu-west-1",
        "endpoint_url": "http://127.0.0.1:9000", "addressing_style": "path",
        "sse": "aws:kms", "kms_key_id": "alias/mirror", "storage_class": "STANDARD_IA",
        "profile": "mirror", "part_size": "32MiB", "max_parallel_parts": 3,
        "redirect": True, "redirect_expiry": "2m", "metadata_ttl": "10s",
        "local_cache": {"path": "/var/cache/mc", "max_size": "10GiB"}}}, "upstreams": UP}, {})
    assert cfg.storage.s3 == S3StorageConfig(
        bucket="my-cache", prefix="/mirror/", region="eu-west-1",
        endpoint_url="http://127.0.0.1:9000", addressing_style="path", sse="aws:kms",
        kms_key_id="alias/mirror", storage_class="STANDARD_IA", profile="mirror",
        part_size=32 * MiB, max_parallel_parts=3, redirect=True, redirect_expiry=120.0,
        local_cache=S3LocalCacheConfig(Path("/var/cache/mc"), 10 << 30), metadata_ttl=10.0)
    minimal = parse_config({"storage": {"s3": {"bucket": "b-1"}}, "upstreams": UP}, {})
    assert minimal.storage.s3 == S3StorageConfig(bucket="b-1")
    assert minimal.storage.s3.part_size == 16 * MiB  # type: ignore[union-attr]
    assert parse_config({"upstreams": UP}, {}).storage.s3 is None


def test_s3_problems_have_key_paths() -> None:
    assert problems({"s3": {"sse": "rot13", "kms_key_id": "k", "part_size": "4MiB",
                            "local_cache": {"path": "/x", "max_size": "lots"},
                            "aws_secret_access_key": "hunter2", "addressing_style": "odd",
                            "bucket_name": "x"}}) == [
        "storage.s3.bucket: is required",
        "storage.s3.sse: expected one of AES256, aws:kms",
        "storage.s3.kms_key_id: only with sse: aws:kms",
        "storage.s3.aws_secret_access_key: no credentials in the config: use the AWS default "
        "chain (environment, shared files, web identity, instance role) or profile",
        "storage.s3.part_size: must be at least 5MiB (S3's smallest part)",
        "storage.s3.local_cache.max_size: invalid size 'lots' (use e.g. 500GiB, 200GB or bytes)",
        "storage.s3.addressing_style: expected one of auto, virtual, path",
        "storage.s3.bucket_name: unknown key",
    ]
    assert problems({"filesystem": {"path": "/x"}, "s3": {"bucket": "b-1"}}) == [
        "storage.s3: set exactly one of storage.filesystem and storage.s3"]
    assert problems({"s3": {"bucket": "Not_A_Bucket", "endpoint_url": "minio:9000"}}) == [
        "storage.s3.bucket: not a valid S3 bucket name: 'Not_A_Bucket'",
        "storage.s3.endpoint_url: expected an http(s) URL, got 'minio:9000'"]
    assert problems({"s3": {"bucket": "b-1", "local_cache": {"path": "/x"}}}) == [
        "storage.s3.local_cache.max_size: is required"]


def test_sizes() -> None:
    assert parse_size(1024) == 1024
    assert parse_size("512MiB") == 512 * MiB
    assert parse_size("10GiB") == 10 << 30
    assert parse_size("2GB") == 2_000_000_000
    assert parse_size("1.5KiB") == 1536
    for bad in ("", "MiB", "-1", "5 parsecs", True, -3):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_s3_needs_no_filesystem_section(tmp_path: Path) -> None:
    tier = parse_config({"storage": {"s3": {"bucket": "b-1", "local_cache": {
        "path": "/var/tier", "max_size": "1GiB"}}}, "upstreams": UP}, {}).storage
    assert tier.filesystem is None
    assert tier.metadata_path == Path("/var/tier/metadata")
    assert tier.local_root == Path("/var/tier")  # spools and start-up cleanup live here
    with pytest.raises(ValueError, match="filesystem storage backend"):
        tier.fs_path  # noqa: B018
    bare = parse_config({"storage": {"s3": {"bucket": "b-1"}, "metadata_path": "/m/meta"},
                         "upstreams": UP}, {}).storage
    assert (bare.metadata_path, bare.local_root) == (Path("/m/meta"), Path("/m"))
    assert problems({"s3": {"bucket": "b-1"}, "max_size": "1GiB"}) == [
        "storage.max_size: with storage.s3 the bucket is not size-limited here; bound the "
        "local tier with storage.s3.local_cache.max_size"]
    assert parse_config({"storage": {"s3": {"bucket": "b-1", "stale_upload_age": "2h"}},
                         "upstreams": UP}, {}).storage.s3.stale_upload_age == 7200.0  # type: ignore[union-attr]


def test_fs_only_commands_say_so(tmp_path: Path) -> None:
    import subprocess
    import sys

    import yaml
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"storage": {"s3": {"bucket": "b-1"},
                                                  "metadata_path": str(tmp_path / "meta")},
                                      "upstreams": UP}))
    for command in ("verify", "gc", "inventory"):
        done = subprocess.run([sys.executable, "-m", "mirrorcache", command, "--config",
                               str(config)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 1
        assert done.stderr.startswith(f"mirrorcache {command} works on the filesystem "
                                      "backend only; storage.s3 is set")
