"""Shared pytest fixtures: token server, real docker-registry processes, unique repo names.

The registries are session-scoped (one process each for the whole run); tests keep out of
each other's way by pushing to ``unique_repo``. Tests marked ``integration`` (and the registry
fixtures) are skipped with a clear reason only when docker-registry / skopeo are missing, and
never on CI (``CI=true``), where a missing tool fails the run instead.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path

import pytest

from tests.support.countingproxy import CountingProxy
from tests.support.mirror import Mirror, mirror_config
from tests.support.registry import RegistryProcess, registry_binary
from tests.support.s3server import MotoServer
from tests.support.skopeo import skopeo_binary
from tests.support.tokenserver import TokenServer

NO_REGISTRY = "docker-registry binary not installed (apt-get install docker-registry)"
NO_SKOPEO = "skopeo binary not installed (apt-get install skopeo)"


def in_ci(environ: Mapping[str, str]) -> bool:
    """True on a CI runner (GitHub Actions, GitLab CI, ... set ``CI=true``)."""
    return environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def integration_gate(missing: list[str], environ: Mapping[str, str]) -> str | None:
    """The reason to skip integration tests, None to run them; on CI a missing tool is an
    error (pytest.UsageError), never a silent skip of every integration test."""
    if not missing:
        return None
    reason = "; ".join(missing)
    if in_ci(environ):
        raise pytest.UsageError(f"CI=true but integration tools are missing: {reason}")
    return reason


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``@pytest.mark.integration`` tests if docker-registry or skopeo is missing
    (outside CI; on CI that fails the run)."""
    if not any(item.get_closest_marker("integration") is not None for item in items):
        return
    missing = [
        reason
        for ok, reason in ((registry_binary(), NO_REGISTRY), (skopeo_binary(), NO_SKOPEO))
        if not ok
    ]
    reason = integration_gate(missing, os.environ)
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if item.get_closest_marker("integration") is not None:
            item.add_marker(skip)


def _require_registry() -> None:
    if registry_binary() is None:
        if in_ci(os.environ):
            pytest.fail(f"CI=true: {NO_REGISTRY}")
        pytest.skip(NO_REGISTRY)


@pytest.fixture(scope="session")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenServer]:
    """A running bearer token server (anonymous requests get every requested action)."""
    with TokenServer(workdir=tmp_path_factory.mktemp("tokenserver")) as server:
        yield server


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProcess]:
    """An anonymous docker-registry (Distribution 2.8.2) on 127.0.0.1."""
    _require_registry()
    with RegistryProcess(workdir=tmp_path_factory.mktemp("registry")) as reg:
        yield reg


@pytest.fixture(scope="session")
def auth_registry(
    tmp_path_factory: pytest.TempPathFactory, token_server: TokenServer
) -> Iterator[RegistryProcess]:
    """A docker-registry that requires bearer tokens from ``token_server``."""
    _require_registry()
    with RegistryProcess(
        token_server=token_server, workdir=tmp_path_factory.mktemp("auth-registry")
    ) as reg:
        yield reg


@pytest.fixture
def unique_repo() -> str:
    """A fresh repository name (``test/<12 hex>``) so tests sharing a registry never collide."""
    return f"test/{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    """moto's standalone server (S3, ECR) as a separate process on a loopback port."""
    with MotoServer() as server:
        yield server


@pytest.fixture
async def hub_and_mirror(tmp_path: Path, registry: RegistryProcess
                         ) -> AsyncIterator[tuple[CountingProxy, Mirror]]:
    """A mirror whose ``docker.io`` upstream is the session registry behind a CountingProxy
    (``hub``: the requests that reached upstream)."""
    async with CountingProxy(registry.url) as hub:
        async with Mirror(mirror_config(tmp_path, {"docker.io": {"url": hub.url}})) as mirror:
            yield hub, mirror
