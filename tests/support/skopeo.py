"""Drive skopeo 1.9.3 as a real registry client (pulls) from async tests.

skopeo runs as an asyncio subprocess with: an ``insecureAcceptAnything`` policy file written
to a private temp dir (the system policy is not relied upon), an empty registries.conf and
auth file, ``TMPDIR``/``--tmpdir`` in that temp dir, and ``--src-tls-verify=false`` so plain
http on 127.0.0.1 works. Copies go to ``dir:<dest>`` (which in skopeo 1.9.3 also holds a
multi-arch list: the list is ``manifest.json``, each instance ``<hex>.manifest.json``) or to
``oci:<dest>`` if requested.
"""

from __future__ import annotations

import asyncio
import atexit
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

SKOPEO_BIN = "/usr/bin/skopeo"

_env_dir: Path | None = None


def skopeo_binary() -> str | None:
    """Path of the skopeo binary, or None if it is not installed."""
    if os.access(SKOPEO_BIN, os.X_OK):
        return SKOPEO_BIN
    return shutil.which("skopeo")


def _skopeo_env_dir() -> Path:
    """A private dir with policy.json, registries.conf, auth.json and tmp/ (made once)."""
    global _env_dir
    if _env_dir is None or not _env_dir.exists():
        d = Path(tempfile.mkdtemp(prefix="mirrorcache-skopeo-"))
        (d / "policy.json").write_text(
            json.dumps({"default": [{"type": "insecureAcceptAnything"}]})
        )
        (d / "registries.conf").write_text("unqualified-search-registries = []\n")
        (d / "auth.json").write_text('{"auths": {}}')
        (d / "tmp").mkdir()
        atexit.register(shutil.rmtree, d, True)
        _env_dir = d
    return _env_dir


def _env() -> dict[str, str]:
    d = _skopeo_env_dir()
    env = {
        k: v
        for k, v in os.environ.items()
        if k.lower() not in {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}
    }
    env.update(
        TMPDIR=str(d / "tmp"),
        CONTAINERS_REGISTRIES_CONF=str(d / "registries.conf"),
        REGISTRY_AUTH_FILE=str(d / "auth.json"),
    )
    return env


@dataclass(frozen=True)
class CompletedCopy:
    """Result of a successful :func:`skopeo_copy`."""

    argv: tuple[str, ...]
    dest: str
    dest_dir: Path
    stdout: str
    stderr: str
    seconds: float


class SkopeoError(RuntimeError):
    """skopeo failed or timed out; the message includes stderr."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stderr: str) -> None:
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stderr = stderr
        super().__init__(f"skopeo failed (rc={returncode}): {' '.join(argv)}\n{stderr}")


async def run_skopeo(
    args: Sequence[str],
    *,
    global_args: Sequence[str] = (),
    timeout: float = 120,
) -> tuple[bytes, str]:
    """Run ``skopeo <global flags> args``; return (stdout bytes, stderr) or raise SkopeoError."""
    binary = skopeo_binary()
    if binary is None:
        raise RuntimeError("skopeo binary not found")
    d = _skopeo_env_dir()
    argv = [binary, "--policy", str(d / "policy.json"), "--tmpdir", str(d / "tmp")]
    argv += [*global_args, *args]
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=_env(),
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        _, err = await proc.communicate()
        raise SkopeoError(argv, None, f"timed out after {timeout}s\n{err.decode()}") from None
    if proc.returncode != 0:
        raise SkopeoError(argv, proc.returncode, err.decode(errors="replace"))
    return out, err.decode(errors="replace")


def _creds_args(prefix: str, creds: tuple[str, str] | None) -> list[str]:
    return [f"--{prefix}-creds", f"{creds[0]}:{creds[1]}"] if creds else []


async def skopeo_copy(
    src_ref: str,
    dest_dir: str | Path,
    *,
    all_images: bool = False,
    creds: tuple[str, str] | None = None,
    tls_verify: bool = False,
    dest_format: Literal["dir", "oci"] = "dir",
    override_arch: str | None = None,
    extra: Sequence[str] = (),
    timeout: float = 120,
) -> CompletedCopy:
    """``skopeo copy [--all] --preserve-digests <src_ref> dir:<dest_dir>``.

    ``src_ref`` is a full reference such as ``docker://127.0.0.1:5000/repo:tag`` (a bare
    ``host/repo:tag`` gets ``docker://`` prepended). Without ``all_images`` a multi-arch source
    resolves to the host platform, or to ``override_arch``. ``extra`` is appended to the
    ``copy`` arguments. ``--preserve-digests`` makes skopeo fail instead of silently
    converting a manifest, so byte-for-byte assertions are meaningful.
    """
    if "://" not in src_ref:
        src_ref = f"docker://{src_ref}"
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = f"{dest_format}:{dest_dir}"
    args = ["copy", "--quiet", "--preserve-digests"]
    args.append(f"--src-tls-verify={'true' if tls_verify else 'false'}")
    args += _creds_args("src", creds) if creds else ["--src-no-creds"]
    if all_images:
        args.append("--all")
    args += [*extra, src_ref, dest]
    start = time.monotonic()
    global_args = ["--override-arch", override_arch] if override_arch else []
    out, err = await run_skopeo(args, global_args=global_args, timeout=timeout)
    elapsed = time.monotonic() - start
    return CompletedCopy(tuple(args), dest, dest_dir, out.decode(errors="replace"), err, elapsed)


async def skopeo_inspect_raw(
    ref: str,
    *,
    creds: tuple[str, str] | None = None,
    tls_verify: bool = False,
    timeout: float = 60,
) -> bytes:
    """``skopeo inspect --raw``: the manifest bytes exactly as served."""
    if "://" not in ref:
        ref = f"docker://{ref}"
    args = ["inspect", "--raw", f"--tls-verify={'true' if tls_verify else 'false'}"]
    args += ["--creds", f"{creds[0]}:{creds[1]}"] if creds else ["--no-creds"]
    out, _ = await run_skopeo([*args, ref], timeout=timeout)
    return out


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def _is_oci_layout(dest_dir: Path) -> bool:
    return (dest_dir / "oci-layout").exists()


def _manifest_files(dest_dir: Path) -> list[Path]:
    if _is_oci_layout(dest_dir):
        return [
            p
            for p in (dest_dir / "blobs" / "sha256").iterdir()
            if _looks_like_manifest(p.read_bytes())
        ]
    return sorted(dest_dir.glob("*manifest.json"))


def _looks_like_manifest(data: bytes) -> bool:
    try:
        doc: Any = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(doc, dict) and ("manifests" in doc or "layers" in doc)


def copied_blob_digests(dest_dir: str | Path) -> set[str]:
    """sha256 (recomputed from the bytes) of every copied blob file, manifests excluded."""
    dest_dir = Path(dest_dir)
    manifests = set(_manifest_files(dest_dir))
    if _is_oci_layout(dest_dir):
        files = list((dest_dir / "blobs" / "sha256").iterdir())
    else:
        files = [p for p in dest_dir.iterdir() if len(p.name) == 64 and p.is_file()]
    return {_sha256_file(p) for p in files if p not in manifests}


def copied_manifest_digests(dest_dir: str | Path) -> set[str]:
    """sha256 (recomputed) of every manifest file copied (top-level and instances)."""
    return {_sha256_file(p) for p in _manifest_files(Path(dest_dir))}


def manifest_digest(dest_dir: str | Path) -> str:
    """Digest of the top-level manifest (or index/list) that was copied."""
    dest_dir = Path(dest_dir)
    if _is_oci_layout(dest_dir):
        index = json.loads((dest_dir / "index.json").read_text())
        return str(index["manifests"][-1]["digest"])
    return _sha256_file(dest_dir / "manifest.json")
