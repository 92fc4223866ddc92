"""Secrets read once at load time: passwords and credential files, from a file or the env."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from mirrorcache.config._section import _Section


def read_secret(sec: _Section, environ: Mapping[str, str]) -> str | None:
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


def read_credentials(sec: _Section, name: str, environ: Mapping[str, str]) -> str | None:
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
