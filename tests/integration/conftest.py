"""Session fixtures for the container tests: a private dockerd and the image built on it.

Skipped with the reason when dockerd cannot start. With CI=true a missing docker.io or
debootstrap install is a failure instead: CI installs both, so a skip there would hide it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from tests.support.dockerd import (
    Dockerd,
    DockerUnavailable,
    base_tarball,
    build_image,
    wheelhouse,
)

IMAGE = "mirrorcache:test"


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def dockerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dockerd]:
    try:
        daemon = Dockerd(tmp_path_factory.mktemp("dockerd"))
    except DockerUnavailable as exc:  # binaries missing
        _unavailable(str(exc))
        raise
    try:
        daemon.start()
    except DockerUnavailable as exc:  # installed, but this machine cannot run it
        pytest.skip(f"dockerd cannot start: {exc}")
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture(scope="session")
def mirrorcache_image(dockerd: Dockerd, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The repository's Dockerfile built on a debootstrap bookworm base; its tag."""
    work = tmp_path_factory.mktemp("image")
    start = time.monotonic()
    try:
        tarball = base_tarball(work / "debootstrap.log")
    except DockerUnavailable as exc:
        _unavailable(str(exc))
        raise
    base = dockerd.import_base(tarball)
    wheels = wheelhouse(work / "wheels")
    build_image(dockerd, IMAGE, base, wheels)
    print(f"\nimage {IMAGE} built in {time.monotonic() - start:.0f}s")
    return IMAGE
