"""Orphaned partial files (a crashed worker's) are removed; live ones are kept."""

from __future__ import annotations

import os
import time
from pathlib import Path

from mirrorcache.oci.reference import Digest
from mirrorcache.storage.base import blob_claim_key
from mirrorcache.storage.fs import FilesystemBlobStore


async def test_cleanup_orphans_keeps_live_and_young_files(tmp_path: Path) -> None:
    store = FilesystemBlobStore(tmp_path)
    live, dead, young = (Digest("sha256", c * 64) for c in "abc")
    claim = store.claim(blob_claim_key(live))
    assert claim is not None
    async with store.writer(live) as w_live, store.writer(dead) as w_dead, \
            store.writer(young) as w_young:
        for w in (w_live, w_dead, w_young):
            await w.write(b"partial")
        old = time.time() - 3600
        for w in (w_live, w_dead):
            assert w.local_path is not None
            os.utime(w.local_path, (old, old))
        assert await store.cleanup_orphans(min_age=60) == 1
        assert w_dead.local_path is not None and not w_dead.local_path.exists()
        assert w_live.local_path is not None and w_live.local_path.exists()
        assert w_young.local_path is not None and w_young.local_path.exists()
    claim.release(done=False)
    assert list((tmp_path / "tmp").glob("*.part")) == []
