"""The BlobStore contract: what every backend must do, run against each backend.

A new backend joins by adding a param to the ``store`` fixture (a factory that yields a fresh,
empty store); every test here must then pass unchanged. Backend-specific behaviour (file
layout, temp files, claims) is tested beside the backend, e.g. test_storage_fs.py.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import pytest

from mirrorcache.oci.reference import Digest
from mirrorcache.storage.base import (
    BlobInfo,
    BlobNotFound,
    BlobStore,
    DigestMismatch,
    StorageError,
    put_bytes,
    read_bytes,
)
from mirrorcache.storage.fs import FilesystemBlobStore

StoreFactory = Callable[[Path], AbstractAsyncContextManager[BlobStore]]


@asynccontextmanager
async def _filesystem(tmp_path: Path) -> AsyncIterator[BlobStore]:
    yield FilesystemBlobStore(tmp_path / "fs")


#: name -> factory of a fresh store. Add a backend here (e.g. "s3" against a local server).
BACKENDS: dict[str, StoreFactory] = {"filesystem": _filesystem}


@pytest.fixture(params=sorted(BACKENDS))
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlobStore]:
    async with BACKENDS[request.param](tmp_path) as s:
        yield s


def digest_of(data: bytes, algorithm: str = "sha256") -> Digest:
    return Digest(algorithm, hashlib.new(algorithm, data).hexdigest())


async def collect(store: BlobStore, digest: Digest, offset: int = 0,
                  length: int | None = None) -> bytes:
    return b"".join([chunk async for chunk in store.reader(digest, offset, length)])


async def listed(store: BlobStore) -> set[BlobInfo]:
    return {info async for info in store.list()}


DATA = b"contract bytes " * 700


async def test_write_commit_stat_read(store: BlobStore) -> None:
    d = digest_of(DATA)
    assert await store.stat(d) is None
    async with store.writer(d) as w:
        await w.write(DATA[:3000])
        await w.write(DATA[3000:])
        await w.flush()
        assert w.size == len(DATA)
        assert await store.stat(d) is None  # nothing visible before commit
        assert await w.commit() == BlobInfo(d, len(DATA))
    assert await store.stat(d) == BlobInfo(d, len(DATA))
    assert await collect(store, d) == DATA
    assert await read_bytes(store, d, len(DATA)) == DATA


async def test_writer_spool_is_readable_while_writing(store: BlobStore) -> None:
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
async def test_reader_ranges(store: BlobStore, offset: int, length: int | None,
                             want: bytes) -> None:
    d = digest_of(DATA)
    await put_bytes(store, d, DATA)
    assert await collect(store, d, offset, length) == want


async def test_list_and_delete(store: BlobStore) -> None:
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


async def test_missing_blob(store: BlobStore) -> None:
    d = digest_of(b"never written")
    assert await store.stat(d) is None
    with pytest.raises(BlobNotFound):
        await collect(store, d)
    with pytest.raises(BlobNotFound):
        await read_bytes(store, d, 100)


async def test_read_bytes_size_limit(store: BlobStore) -> None:
    d = digest_of(DATA)
    await put_bytes(store, d, DATA)
    with pytest.raises(StorageError):
        await read_bytes(store, d, len(DATA) - 1)


async def test_digest_mismatch_publishes_nothing(store: BlobStore) -> None:
    d = digest_of(b"expected")
    async with store.writer(d) as w:
        await w.write(b"something else")
        with pytest.raises(DigestMismatch) as exc:
            await w.commit()
    assert exc.value.expected == d and exc.value.size == len(b"something else")
    assert exc.value.actual == str(digest_of(b"something else"))
    assert await store.stat(d) is None
    assert await listed(store) == set()
    with pytest.raises(DigestMismatch):
        await put_bytes(store, d, b"wrong")


async def test_cancel_publishes_nothing(store: BlobStore) -> None:
    d = digest_of(DATA)
    async with store.writer(d) as w:
        await w.write(DATA)
        await w.cancel()
    assert await store.stat(d) is None
    assert await listed(store) == set()


async def test_leaving_without_commit_publishes_nothing(store: BlobStore) -> None:
    d = digest_of(DATA)
    async with store.writer(d) as w:
        await w.write(DATA)
    assert await store.stat(d) is None
    with pytest.raises(RuntimeError):
        async with store.writer(d) as w:
            await w.write(DATA)
            raise RuntimeError("the caller failed")
    assert await store.stat(d) is None
    assert await listed(store) == set()


async def test_concurrent_writers_of_one_digest(store: BlobStore) -> None:
    data = bytes(range(256)) * 4096  # 1 MiB
    d = digest_of(data)
    both_writing = asyncio.Barrier(2)

    async def write() -> BlobInfo:
        async with store.writer(d) as w:
            await w.write(data[:1000])
            await both_writing.wait()
            await w.write(data[1000:])
            return await w.commit()

    assert await asyncio.gather(write(), write()) == [BlobInfo(d, len(data))] * 2
    assert await store.stat(d) == BlobInfo(d, len(data))
    assert await collect(store, d) == data
    assert await listed(store) == {BlobInfo(d, len(data))}


async def test_multi_mib_blob_in_many_chunks(store: BlobStore) -> None:
    data = hashlib.shake_256(b"seed").digest(5 * 1024 * 1024 + 123)
    d = digest_of(data)
    async with store.writer(d) as w:
        for i in range(0, len(data), 64 * 1024 + 7):
            await w.write(data[i:i + 64 * 1024 + 7])
        assert await w.commit() == BlobInfo(d, len(data))
    assert await store.stat(d) == BlobInfo(d, len(data))
    assert hashlib.sha256(await collect(store, d)).hexdigest() == d.hex
    middle = 2 * 1024 * 1024 + 5
    assert await collect(store, d, middle, 3 * 1024 * 1024) == data[middle:middle + 3 * 1024 * 1024]
