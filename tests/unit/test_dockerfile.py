"""Lint the Dockerfile (no Docker engine here): parse it with the official Go parser and
check the rules we hold it to."""

from __future__ import annotations

from pathlib import Path

import dockerfile
import pytest

from mirrorcache.config import load_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def commands() -> tuple[dockerfile.Command, ...]:
    return dockerfile.parse_file(str(ROOT / "Dockerfile"))


def test_base_images_are_pinned(commands: tuple[dockerfile.Command, ...]) -> None:
    """Every stage starts from the BASE_IMAGE build arg, whose default is a pinned tag."""
    bases = [c.value[0] for c in commands if c.cmd == "FROM"]
    assert len(bases) >= 2 and all(b == "${BASE_IMAGE}" for b in bases)
    defaults = [c.value[0] for c in commands if c.cmd == "ARG" and "=" in c.value[0]
                and c.value[0].startswith("BASE_IMAGE=")]
    assert defaults == ["BASE_IMAGE=python:3.11-slim-bookworm"]


def test_runs_as_non_root_with_healthcheck(commands: tuple[dockerfile.Command, ...]) -> None:
    final = commands[max(i for i, c in enumerate(commands) if c.cmd == "FROM"):]
    users = [c.value[0] for c in final if c.cmd == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert any(c.cmd == "HEALTHCHECK" and "/healthz" in c.original for c in final)
    assert [c.value for c in final if c.cmd == "EXPOSE"] == [("5000",)]
    assert [c.value for c in final if c.cmd == "ENTRYPOINT"] == [("tini", "--", "mirrorcache")]


def test_no_shell_form_pitfalls(commands: tuple[dockerfile.Command, ...]) -> None:
    for c in commands:
        if c.cmd == "RUN":
            assert "apt-get install" not in c.original or "--no-install-recommends" in \
                c.original
            assert "curl " not in c.original and "wget " not in c.original
        if c.cmd in ("ADD",):
            pytest.fail("use COPY, not ADD")
        if c.cmd == "COPY" and "--from" not in " ".join(c.flags):
            for src in c.value[:-1]:
                assert (ROOT / src).exists(), f"COPY source {src} missing"


def test_baked_config_is_valid() -> None:
    cfg = load_config(ROOT / "config" / "docker.yaml", {})
    assert cfg.listen_port == 5000
    assert str(cfg.storage.filesystem.path) == "/var/lib/mirrorcache"
