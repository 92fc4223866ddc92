"""Docker Hub's quirks: aliases, the library/ namespace, the rate-limit headers."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from mirrorcache.upstream.dockerhub import (
    RateLimit,
    canonical_host,
    canonical_repository,
    is_docker_hub,
    parse_ratelimit,
)


@pytest.mark.parametrize("host", ["docker.io", "registry-1.docker.io", "Index.Docker.IO",
                                  "registry.hub.docker.com"])
def test_aliases_fold_into_docker_io(host: str) -> None:
    assert canonical_host(host) == "docker.io"
    assert is_docker_hub(canonical_host(host))


def test_other_hosts_are_only_lower_cased() -> None:
    assert canonical_host("Quay.IO") == "quay.io"
    assert not is_docker_hub("quay.io")
    assert not is_docker_hub("registry-1.docker.io")  # only the canonical name is Hub


def test_library_prefix_only_for_single_component_hub_names() -> None:
    assert canonical_repository("docker.io", "alpine") == "library/alpine"
    assert canonical_repository("docker.io", "library/alpine") == "library/alpine"
    assert canonical_repository("docker.io", "bitnami/redis") == "bitnami/redis"
    assert canonical_repository("quay.io", "alpine") == "alpine"


def test_ratelimit_headers_parsed_case_insensitively() -> None:
    headers = CIMultiDict({"RateLimit-Limit": "100;w=21600", "RateLimit-Remaining": "76;w=21600"})
    assert parse_ratelimit(headers) == RateLimit("100;w=21600", "76;w=21600", 76.0)


def test_ratelimit_absent_or_unparseable() -> None:
    assert parse_ratelimit({}) is None
    assert parse_ratelimit({"ratelimit-limit": "100"}) is None
    assert parse_ratelimit({"ratelimit-remaining": "lots"}) == RateLimit("", "lots", None)
