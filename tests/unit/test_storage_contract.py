"""The BlobStore contract, run against every backend: filesystem, S3 (moto server process) and
tiered (S3 behind a local disk tier).

A new backend joins by adding a param to the ``store`` fixture (``make_store``); every test
here must then pass unchanged. Backend-specific behaviour (file layout, temp files, claims)
is tested beside the backend, e.g. test_storage_fs.py.

Run against the real moto standalone server (``tests/support/s3server.py``), never an
in-process mock. S3-only checks (no pending multipart upload left, the janitor after a
killed writer process, presigned URLs) are at the end.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import tracemalloc
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mirrorcache.config import MiB, S3LocalCacheConfig, S3StorageConfig
from mirrorcache.oci.reference import Digest
from mirrorcache.storage.base import (
    BlobInfo,
    BlobNotFound,
    BlobStore,
    DigestMismatch,
    LocalTier,
    StorageError,
    put_bytes,
    read_bytes,
)
from mirrorcache.storage.fs import FilesystemBlobStore
from mirrorcache.storage.s3 import S3BlobStore
from mirrorcache.storage.tiered import TieredBlobStore, open_s3_store
from tests.support.s3server import REGION, MotoServer, aws_env, aws_session, make_bucket

PART = 5 * MiB
REPO_ROOT = str(Path(__file__).resolve().parents[2])
BACKENDS = ["filesystem", "s3", "tiered"]


def digest_of(data: bytes, algorithm: str = "sha256") -> Digest:
    return Digest(algorithm, hashlib.new(algorithm, data).hexdigest())


def s3_cfg(server: MotoServer, bucket: str, **kw: Any) -> S3StorageConfig:
    base: dict[str, Any] = dict(bucket=bucket, prefix="cache/v1", region=REGION,
                                endpoint_url=server.url, addressing_style="path",
                                part_size=PART, max_parallel_parts=2)
    base.update(kw)
    return S3StorageConfig(**base)


async def make_store(kind: str, tmp_path: Path, server: MotoServer, **kw: Any
                     ) -> AsyncIterator[Any]:
    if kind == "filesystem":
        yield FilesystemBlobStore(tmp_path / "fs")
        return
    bucket = await make_bucket(server)
    if kind == "s3":
        async with S3BlobStore(s3_cfg(server, bucket, **kw), tmp_path / "spool",
                               session=aws_session()) as store:
            yield store
        return
    local = S3LocalCacheConfig(tmp_path / "tier", kw.pop("max_size", 64 * MiB))
    cfg = s3_cfg(server, bucket, local_cache=local, **kw)
    async with S3BlobStore(cfg, local.path / "tmp", session=aws_session()) as remote, \
            TieredBlobStore(remote, local.path, local.max_size) as tiered:
        yield tiered


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path, moto_server: MotoServer
                ) -> AsyncIterator[Any]:
    async for s in make_store(request.param, tmp_path, moto_server):
        yield s


def s3_of(store: Any) -> S3BlobStore | None:
    if isinstance(store, S3BlobStore):
        return store
    remote = getattr(store, "remote", None)
    return remote if isinstance(remote, S3BlobStore) else None


async def collect(store: Any, digest: Digest, offset: int = 0,
                  length: int | None = None) -> bytes:
    return b"".join([c async for c in store.reader(digest, offset, length)])


async def assert_nothing_left(store: Any, digest: Digest, spool: Path | None) -> None:
    assert await store.stat(digest) is None
    assert store.local_path(digest) is None or not store.local_path(digest).exists()
    with pytest.raises(BlobNotFound):
        await collect(store, digest)
    if spool is not None:
        assert spool.name not in os.listdir(spool.parent)
    s3 = s3_of(store)
    if s3 is not None:
        assert await s3.pending_uploads() == []
        assert [i async for i in s3.list()] == []


async def test_backends_satisfy_the_protocol(store: Any) -> None:
    typed: BlobStore = store  # mypy checks the shape; here: no method is missing
    for name in ("stat", "reader", "writer", "delete", "list", "local_path"):
        assert callable(getattr(typed, name))


async def test_write_commit_stat_ranges_list_delete(store: Any) -> None:
    data = os.urandom(3 * MiB + 17)
    d = digest_of(data)
    assert await store.stat(d) is None
    async with store.writer(d) as w:
        for i in range(0, len(data), 256 * 1024):
            await w.write(data[i:i + 256 * 1024])
        await w.flush()
        assert w.size == len(data)
        assert w.local_path is not None
        assert w.local_path.read_bytes() == data  # a reader can tail the spool
        info = await w.commit()
    assert (info.digest, info.size) == (d, len(data))
    stat = await store.stat(d)
    assert stat is not None and stat.size == len(data)
    assert await collect(store, d) == data
    assert await collect(store, d, 5, 10) == data[5:15]
    assert await collect(store, d, MiB + 3) == data[MiB + 3:]
    assert await collect(store, d, len(data) - 4, 100) == data[-4:]
    assert await collect(store, d, len(data)) == b""
    assert await collect(store, d, 7, 0) == b""
    assert [(i.digest, i.size) async for i in store.list()] == [(d, len(data))]
    await store.delete(d)
    assert await store.stat(d) is None
    await store.delete(d)  # idempotent
    assert [i async for i in store.list()] == []


async def test_empty_blob(store: Any) -> None:
    d = digest_of(b"")
    async with store.writer(d) as w:
        await w.commit()
    assert (await store.stat(d)).size == 0  # type: ignore[union-attr]
    assert await collect(store, d) == b""


async def test_missing_blob(store: Any) -> None:
    d = digest_of(b"never written")
    assert await store.stat(d) is None
    with pytest.raises(BlobNotFound):
        await collect(store, d)
    with pytest.raises(BlobNotFound):
        await collect(store, d, 3, 4)


@pytest.mark.parametrize("size", [100, 12 * MiB + 1])
async def test_digest_mismatch_leaves_nothing(store: Any, size: int) -> None:
    data = os.urandom(size)
    wrong = digest_of(b"something else")
    async with store.writer(wrong) as w:
        for i in range(0, len(data), MiB):
            await w.write(data[i:i + MiB])
        spool = w.local_path
        if size > PART and s3_of(store) is not None:
            assert w.upload_id is not None  # parts were already on their way
        with pytest.raises(DigestMismatch) as err:
            await w.commit()
    assert err.value.size == size and err.value.actual == str(digest_of(data))
    await assert_nothing_left(store, wrong, spool)


async def test_cancel_and_leaving_without_commit(store: Any) -> None:
    data = os.urandom(11 * MiB)
    d = digest_of(data)
    async with store.writer(d) as w:
        for i in range(0, len(data), MiB):
            await w.write(data[i:i + MiB])
        spool = w.local_path
        await w.cancel()
    await assert_nothing_left(store, d, spool)
    with pytest.raises(RuntimeError):
        async with store.writer(d) as w:
            await w.write(data)
            spool = w.local_path
            raise RuntimeError("client went away")
    await assert_nothing_left(store, d, spool)


async def test_concurrent_writers_of_one_digest(store: Any) -> None:
    data = os.urandom(7 * MiB + 5)
    d = digest_of(data)

    async def write() -> int:
        async with store.writer(d) as w:
            for i in range(0, len(data), 512 * 1024):
                await w.write(data[i:i + 512 * 1024])
            return (await w.commit()).size

    assert await asyncio.gather(write(), write(), write()) == [len(data)] * 3
    assert [(i.digest, i.size) async for i in store.list()] == [(d, len(data))]
    assert hashlib.sha256(await collect(store, d)).hexdigest() == d.hex
    s3 = s3_of(store)
    if s3 is not None:
        assert await s3.pending_uploads() == []


async def test_large_blob_in_parts_bounded_memory(store: Any) -> None:
    size = 64 * MiB + 123
    chunk = os.urandom(MiB)
    h = hashlib.sha256()
    for i in range(0, size, MiB):
        h.update(chunk[:min(MiB, size - i)])
    d = Digest("sha256", h.hexdigest())
    tracemalloc.start()
    try:
        async with store.writer(d) as w:
            for i in range(0, size, MiB):
                await w.write(chunk[:min(MiB, size - i)])
            await w.commit()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Bounded by the parts in flight, not by the blob: each of max_parallel_parts (2) parts
    # of 5 MiB, and one finished but not yet collected (writes never wait for S3), is held
    # about twice (read back from the spool; botocore's checksum/signing copy), plus the
    # 1 MiB spool batch. 64 MiB would mean the blob was held whole.
    assert peak < (2 + 1) * 2 * PART + 4 * MiB, f"peak {peak / MiB:.1f} MiB"
    assert (await store.stat(d)).size == size  # type: ignore[union-attr]
    got = hashlib.sha256()
    n = 0
    async for c in store.reader(d):
        assert len(c) <= MiB
        got.update(c)
        n += len(c)
    assert (n, got.hexdigest()) == (size, d.hex)
    assert await collect(store, d, 30 * MiB, 11) == chunk[:11]


# S3 only ---------------------------------------------------------------------------------

_KILLED_WRITER = textwrap.dedent("""
    import asyncio, hashlib, os, sys
    from pathlib import Path
    from mirrorcache.config import S3StorageConfig
    from mirrorcache.oci.reference import Digest
    from mirrorcache.storage.s3 import S3BlobStore

    async def main():
        cfg = S3StorageConfig(bucket=sys.argv[1], endpoint_url=sys.argv[2], region="us-east-1",
                              addressing_style="path", prefix="cache/v1",
                              part_size=5 << 20, max_parallel_parts=2)
        data = os.urandom(6 << 20)
        d = Digest("sha256", hashlib.sha256(data).hexdigest())
        async with S3BlobStore(cfg, Path(sys.argv[3])) as store:
            async with store.writer(d) as w:
                await w.write(data)
                while w._inflight:
                    w._parts.append(await w._inflight.popleft())
                print(store.key_of(d), w.upload_id, flush=True)
                await asyncio.Event().wait()

    asyncio.run(main())
""")


async def test_killed_writer_leaves_no_object_and_the_janitor_aborts(
        tmp_path: Path, moto_server: MotoServer) -> None:
    bucket = await make_bucket(moto_server)
    env = aws_env()
    env["PYTHONPATH"] = REPO_ROOT
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _KILLED_WRITER, bucket, moto_server.url, str(tmp_path / "spool"),
        stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        key, upload_id = line.decode().split()
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    async with S3BlobStore(s3_cfg(moto_server, bucket), tmp_path / "spool2",
                           session=aws_session()) as store:
        pending = await store.pending_uploads()
        assert [(u["Key"], u["UploadId"]) for u in pending] == [(key, upload_id)]
        assert [i async for i in store.list()] == []
        # moto reports a fixed Initiated time, so "too young" is judged against a clock set
        # ten seconds after it: the janitor leaves live uploads of other replicas alone.
        young = pending[0]["Initiated"] + timedelta(seconds=10)
        assert await store.abort_stale_uploads(older_than=3600, now=young) == 0
        assert len(await store.pending_uploads()) == 1
        assert await store.abort_stale_uploads(older_than=0) == 1
        assert await store.pending_uploads() == []
        assert [i async for i in store.list()] == []


async def test_presigned_url_serves_the_blob(tmp_path: Path, moto_server: MotoServer) -> None:
    async for store in make_store("s3", tmp_path, moto_server):
        data = os.urandom(300_000)
        d = digest_of(data)
        await put_bytes(store, d, data)
        url = await store.presigned_url(d, 60)
        assert "X-Amz-Signature=" in url and "X-Amz-Expires=60" in url
        async with aiohttp.ClientSession() as http, http.get(url) as resp:
            assert resp.status == 200
            assert await resp.read() == data
        assert url.startswith(f"{moto_server.url}/{store.cfg.bucket}/{store.key_of(d)}?")


async def test_sse_and_storage_class_on_every_write(tmp_path: Path,
                                                    moto_server: MotoServer) -> None:
    async for store in make_store("s3", tmp_path, moto_server, sse="AES256",
                                  storage_class="STANDARD_IA"):
        small, large = os.urandom(1000), os.urandom(6 * MiB)
        for data in (small, large):
            d = digest_of(data)
            await put_bytes(store, d, data)
            head = await store.call("head_object", Key=store.key_of(d))
            assert head["ServerSideEncryption"] == "AES256"
            assert head["StorageClass"] == "STANDARD_IA"


async def test_s3_errors_become_storage_errors(tmp_path: Path, moto_server: MotoServer) -> None:
    cfg = s3_cfg(moto_server, "no-such-bucket-here")
    async with S3BlobStore(cfg, tmp_path / "spool", session=aws_session()) as store:
        with pytest.raises(StorageError):
            await store.check()
        data = b"x" * 100
        with pytest.raises(StorageError):
            await put_bytes(store, digest_of(data), data)
        assert list((tmp_path / "spool").iterdir()) == []


# tiered only -------------------------------------------------------------------------------

async def test_tier_keeps_the_spool_evicts_lru_and_refills_from_s3(
        tmp_path: Path, moto_server: MotoServer) -> None:
    async for tiered in make_store("tiered", tmp_path, moto_server, max_size=7 * MiB):
        blobs = [os.urandom(3 * MiB) for _ in range(3)]
        ds = [digest_of(b) for b in blobs]
        for d, data in zip(ds[:2], blobs[:2], strict=True):
            async with tiered.writer(d) as w:
                await w.write(data)
                spool = w.local_path
                spool_inode = os.stat(spool).st_ino
                await w.commit()
            path = tiered.local_path(d)
            assert path is not None and os.stat(path).st_ino == spool_inode  # spool adopted
            assert path.read_bytes() == data
        assert tiered.local_path(ds[0]) is not None  # a hit: now the most recently used
        await put_bytes(tiered, ds[2], blobs[2])
        # 9 MiB > 7 MiB: the least recently used (ds[1]) left the tier, S3 still has it
        assert tiered.local_path(ds[1]) is None
        assert tiered.local_path(ds[0]) is not None and tiered.local_path(ds[2]) is not None
        assert tiered.used == 6 * MiB
        assert (await tiered.remote.stat(ds[1])).size == 3 * MiB  # type: ignore[union-attr]
        # a local miss streams from S3 (ranged) and fills the tier in the background
        assert await collect(tiered, ds[1], MiB, 5) == blobs[1][MiB:MiB + 5]
        await tiered.wait_fills()
        path = tiered.local_path(ds[1])
        assert path is not None and path.read_bytes() == blobs[1]
        assert tiered.used <= 7 * MiB
        # a blob larger than the whole tier is in S3 only
        big = os.urandom(8 * MiB)
        await put_bytes(tiered, digest_of(big), big)
        assert tiered.local_path(digest_of(big)) is None
        assert await collect(tiered, digest_of(big)) == big
        await tiered.wait_fills()
        assert tiered.local_path(digest_of(big)) is None
        assert os.listdir(tmp_path / "tier" / "tmp") == []


async def test_tier_local_writer_and_publishing_the_local_copy(
        tmp_path: Path, moto_server: MotoServer) -> None:
    """LocalTier: a replica teeing the owner's stream writes its tier only; its verified copy
    is uploaded only when S3 lacks it (the owner died), once."""
    async for tiered in make_store("tiered", tmp_path, moto_server, max_size=16 * MiB):
        assert isinstance(tiered, LocalTier)
        assert not isinstance(FilesystemBlobStore(tmp_path / "fs"), LocalTier)
        data = os.urandom(PART + 1000)  # more than one part: a multipart upload
        d = digest_of(data)
        async with tiered.local_writer(d) as w:
            await w.write(data)
            await w.commit()
        path = tiered.local_path(d)
        assert path is not None and path.read_bytes() == data
        assert tiered.used == len(data)
        assert await tiered.remote.stat(d) is None  # nothing uploaded
        assert await tiered.publish_local(d) is True
        assert await collect(tiered.remote, d) == data
        assert await tiered.publish_local(d) is False  # already there: no second upload
        # a wrong body never commits, locally or in S3
        bad = digest_of(b"other")
        with pytest.raises(DigestMismatch):
            async with tiered.local_writer(bad) as w:
                await w.write(data)
                await w.commit()
        assert tiered.local_path(bad) is None and await tiered.remote.stat(bad) is None
        # a blob larger than the whole tier is not kept (and evicts nothing)
        big = os.urandom(16 * MiB + 1)
        async with tiered.local_writer(digest_of(big)) as w:
            await w.write(big)
            await w.commit()
        assert tiered.local_path(digest_of(big)) is None
        assert tiered.local_path(d) is not None and tiered.used == len(data)
        assert os.listdir(tmp_path / "tier" / "tmp") == []


async def test_tier_survives_a_restart(tmp_path: Path, moto_server: MotoServer) -> None:
    bucket = await make_bucket(moto_server)
    local = S3LocalCacheConfig(tmp_path / "tier", 4 * MiB)
    data = [os.urandom(MiB) for _ in range(3)]
    async with open_s3_store(s3_cfg(moto_server, bucket, local_cache=local), tmp_path / "x",
                             aws_session()) as store:
        for blob in data:
            await put_bytes(store, digest_of(blob), blob)
    smaller = S3LocalCacheConfig(local.path, 2 * MiB)
    async with open_s3_store(s3_cfg(moto_server, bucket, local_cache=smaller), tmp_path / "x",
                             aws_session()) as store:
        assert store.used == 2 * MiB  # type: ignore[union-attr]
        assert sum(store.local_path(digest_of(b)) is not None for b in data) == 2
        for blob in data:
            assert await collect(store, digest_of(blob)) == blob


DATA = b"contract bytes " * 700


async def listed(store: Any) -> set[BlobInfo]:
    return {info async for info in store.list()}


async def test_writer_spool_is_readable_while_writing(store: Any) -> None:
    d = digest_of(DATA)
    async with store.writer(d) as w:
        await w.write(DATA)
        await w.flush()
        if w.local_path is not None:  # a local spool readers of an in-flight blob tail
            assert w.local_path.read_bytes() == DATA
        await w.commit()


@pytest.mark.parametrize(("offset", "length", "want"), [
    (0, None, DATA), (0, 10, DATA[:10]), (100, 50, DATA[100:150]),
    (len(DATA) - 5, None, DATA[-5:]), (len(DATA) - 5, 100, DATA[-5:]), (len(DATA), None, b""),
    (7, 0, b""),
])
async def test_reader_ranges(store: Any, offset: int, length: int | None,
                             want: bytes) -> None:
    d = digest_of(DATA)
    await put_bytes(store, d, DATA)
    assert await collect(store, d, offset, length) == want


async def test_list_and_delete(store: Any) -> None:
    blobs = [b"one", b"two", b"three"]
    digests = [digest_of(b) for b in blobs]
    for d, b in zip(digests, blobs, strict=True):
        await put_bytes(store, d, b)
    d512 = digest_of(b"four", "sha512")
    await put_bytes(store, d512, b"four")
    want = {BlobInfo(d, len(b)) for d, b in zip(digests, blobs, strict=True)}
    assert await listed(store) == want | {BlobInfo(d512, 4)}
    await store.delete(digests[0])
    assert await store.stat(digests[0]) is None
    with pytest.raises(BlobNotFound):
        await collect(store, digests[0])
    await store.delete(digests[0])  # deleting what is gone is not an error
    assert await listed(store) == (want - {BlobInfo(digests[0], 3)}) | {BlobInfo(d512, 4)}


async def test_read_bytes_size_limit(store: Any) -> None:
    d = digest_of(DATA)
    await put_bytes(store, d, DATA)
    with pytest.raises(StorageError):
        await read_bytes(store, d, len(DATA) - 1)
