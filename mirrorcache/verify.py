"""Re-hash every cached blob and report (or remove) any whose content does not match."""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from mirrorcache.storage.base import BlobInfo
from mirrorcache.storage.fs import FilesystemBlobStore

log = structlog.get_logger("mirrorcache.verify")


@dataclass
class VerifyReport:
    """What a verification pass found."""

    checked: int = 0
    bytes: int = 0
    bad: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


def _hash_file(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


async def verify_store(store: FilesystemBlobStore, *, repair: bool) -> VerifyReport:
    """Check every committed blob's digest; with ``repair``, delete the ones that differ."""
    report = VerifyReport()
    info: BlobInfo
    async for info in store.list():
        path = store.path_of(info.digest)
        actual = await asyncio.to_thread(_hash_file, path, info.digest.algorithm)
        report.checked += 1
        report.bytes += info.size
        if actual != info.digest.hex:
            report.bad.append(str(info.digest))
            log.error("verify.mismatch", digest=str(info.digest), actual=actual, size=info.size)
            if repair:
                await store.delete(info.digest)
                report.removed.append(str(info.digest))
    removed_temp = await store.cleanup_temp() if repair else 0
    log.info("verify.finished", checked=report.checked, bad=len(report.bad),
             removed=len(report.removed), temp_removed=removed_temp)
    return report
