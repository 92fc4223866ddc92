"""FilesystemBlobStore: verify-then-rename commits, no leftovers, ranged reads, listing."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from mirrorcache.oci.reference import Digest
from mirrorcache.storage.base import (
    BlobInfo,
    BlobNotFound,
    DigestMismatch,
    StorageError,
    put_bytes,
    read_bytes,
)
from mirrorcache.storage.fs import FilesystemBlobStore


def digest_of(data: bytes, algorithm: str = "sha256") -> Digest:
    return Digest(algorithm, hashlib.new(algorithm, data).hexdigest())


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file())


async def collect(store: FilesystemBlobStore, digest: Digest, offset: int = 0,
                  length: int | None = None) -> bytes:
    return b"".join([chunk async for chunk in store.reader(digest, offset, length)])


@pytest.fixture
def store(tmp_path: Path) -> FilesystemBlobStore:
    return FilesystemBlobStore(tmp_path / "root")


DATA = b"layer bytes " * 1000


async def test_write_commit_stat_read(store: FilesystemBlobStore) -> None:
    d = digest_of(DATA)
    async with store.writer(d) as w:
        await w.write(DATA[:5000])
        await w.write(DATA[5000:])
        assert w.size == len(DATA)
        info = await w.commit()
    assert info == BlobInfo(d, len(DATA))
    assert await store.stat(d) == BlobInfo(d, len(DATA))
    assert await collect(store, d) == DATA
    expected = store.root / "blobs" / "sha256" / d.hex[:2] / d.hex
    assert store.path_of(d) == expected
    assert expected.read_bytes() == DATA
    assert files_under(store.root / "blobs") == [expected]
    assert files_under(store.root / "tmp") == []
    assert await read_bytes(store, d, len(DATA)) == DATA


async def test_large_chunk_goes_through_thread_path(store: FilesystemBlobStore) -> None:
    big = bytes(range(256)) * 1024  # 256 KiB, above the inline-write threshold
    d = digest_of(big)
    async with store.writer(d) as w:
        await w.write(big)
        await w.commit()
    assert await collect(store, d) == big


async def test_sha512_blob(store: FilesystemBlobStore) -> None:
    d = digest_of(b"x", "sha512")
    assert await put_bytes(store, d, b"x") == BlobInfo(d, 1)
    assert store.path_of(d).parent.parent.name == "sha512"
    assert await collect(store, d) == b"x"


async def test_wrong_bytes_raise_and_leave_nothing(store: FilesystemBlobStore) -> None:
    d = digest_of(b"expected content")
    with pytest.raises(DigestMismatch) as exc_info:
        async with store.writer(d) as w:
            await w.write(b"tampered content")
            await w.commit()
    err = exc_info.value
    assert err.expected == d
    assert err.actual == str(digest_of(b"tampered content"))
    assert err.size == len(b"tampered content")
    assert isinstance(err, StorageError)
    assert files_under(store.root / "blobs") == []
    assert files_under(store.root / "tmp") == []
    assert await store.stat(d) is None


async def test_put_bytes_mismatch(store: FilesystemBlobStore) -> None:
    d = digest_of(b"a")
    with pytest.raises(DigestMismatch):
        await put_bytes(store, d, b"b")
    assert files_under(store.root) == []


async def test_leaving_block_without_commit_leaves_nothing(store: FilesystemBlobStore) -> None:
    d = digest_of(DATA)
    async with store.writer(d) as w:
        await w.write(DATA)
        assert w.local_path is not None and w.local_path.exists()
        assert w.local_path.parent == store.root / "tmp"
        assert w.local_path.read_bytes() == DATA  # readable while writing
    assert files_under(store.root) == []
    assert await store.stat(d) is None


async def test_exception_in_block_cancels(store: FilesystemBlobStore) -> None:
    d = digest_of(DATA)
    with pytest.raises(RuntimeError, match="client went away"):
        async with store.writer(d) as w:
            await w.write(DATA[:10])
            raise RuntimeError("client went away")
    assert files_under(store.root) == []


async def test_write_after_commit_is_refused(store: FilesystemBlobStore) -> None:
    d = digest_of(b"abc")
    async with store.writer(d) as w:
        await w.write(b"abc")
        await w.commit()
        with pytest.raises(StorageError, match="write after close"):
            await w.write(b"more")
    assert await collect(store, d) == b"abc"


async def test_cleanup_temp_removes_part_files(store: FilesystemBlobStore) -> None:
    tmp = store.root / "tmp"
    (tmp / "sha256-abc.123456.part").write_bytes(b"crash leftover")
    (tmp / "sha256-def.654321.part").write_bytes(b"")
    (tmp / "sha256-abc.lock").write_bytes(b"{}")
    (tmp / "keep.txt").write_bytes(b"not ours")
    d = digest_of(b"committed")
    await put_bytes(store, d, b"committed")
    assert await store.cleanup_temp() == 3
    assert sorted(p.name for p in tmp.iterdir()) == ["keep.txt"]
    assert await collect(store, d) == b"committed"  # committed blobs untouched
    assert await store.cleanup_temp() == 0


async def test_cleanup_temp_removes_abandoned_writer_file(store: FilesystemBlobStore) -> None:
    d = digest_of(DATA)
    # A writer opened but never finished (as if the process died mid-write).
    cm = store.writer(d)
    w = await cm.__aenter__()
    await w.write(DATA[:100])
    assert len(files_under(store.root / "tmp")) == 1
    assert await store.cleanup_temp() == 1
    assert files_under(store.root / "tmp") == []
    await cm.__aexit__(None, None, None)  # cancel tolerates the missing file
    assert files_under(store.root) == []


async def test_commit_same_digest_twice(store: FilesystemBlobStore) -> None:
    d = digest_of(DATA)
    assert await put_bytes(store, d, DATA) == BlobInfo(d, len(DATA))
    first_inode = store.path_of(d).stat().st_ino
    assert await put_bytes(store, d, DATA) == BlobInfo(d, len(DATA))
    assert store.path_of(d).stat().st_ino == first_inode  # the first copy was kept
    assert files_under(store.root / "blobs") == [store.path_of(d)]
    assert files_under(store.root / "tmp") == []
    assert await collect(store, d) == DATA


async def test_two_writers_same_digest_concurrently(store: FilesystemBlobStore) -> None:
    d = digest_of(b"shared")
    async with store.writer(d) as w1, store.writer(d) as w2:
        assert w1.local_path != w2.local_path
        await w1.write(b"shared")
        await w2.write(b"shared")
        assert await w1.commit() == BlobInfo(d, 6)
        assert await w2.commit() == BlobInfo(d, 6)
    assert files_under(store.root) == [store.path_of(d)]


@pytest.mark.parametrize(
    ("offset", "length", "expected"),
    [(0, None, DATA), (5, None, DATA[5:]), (5, 10, DATA[5:15]), (0, 0, b""),
     (len(DATA) - 3, 100, DATA[-3:]), (len(DATA), None, b""), (0, len(DATA), DATA)],
)
async def test_read_with_offset_and_length(store: FilesystemBlobStore, offset: int,
                                           length: int | None, expected: bytes) -> None:
    d = digest_of(DATA)
    await put_bytes(store, d, DATA)
    assert await collect(store, d, offset, length) == expected


async def test_read_spans_multiple_chunks(store: FilesystemBlobStore,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import mirrorcache.storage.fs as fs

    monkeypatch.setattr(fs, "READ_CHUNK", 1000)
    d = digest_of(DATA)
    await put_bytes(store, d, DATA)
    chunks = [c async for c in store.reader(d, 10, 2500)]
    assert [len(c) for c in chunks] == [1000, 1000, 500]
    assert b"".join(chunks) == DATA[10:2510]


async def test_missing_blob(store: FilesystemBlobStore) -> None:
    d = digest_of(b"never written")
    assert await store.stat(d) is None
    with pytest.raises(BlobNotFound):
        await collect(store, d)
    with pytest.raises(BlobNotFound):
        await read_bytes(store, d, 100)


async def test_read_bytes_size_limit(store: FilesystemBlobStore) -> None:
    d = digest_of(DATA)
    await put_bytes(store, d, DATA)
    assert await read_bytes(store, d, len(DATA)) == DATA
    with pytest.raises(StorageError, match="larger than"):
        await read_bytes(store, d, len(DATA) - 1)


async def test_list_yields_committed_blobs(store: FilesystemBlobStore) -> None:
    blobs = {b"one": None, b"two two": None, b"three three three": None}
    expected = set()
    for data in blobs:
        d = digest_of(data)
        await put_bytes(store, d, data)
        expected.add(BlobInfo(d, len(data)))
    d512 = digest_of(b"five", "sha512")
    await put_bytes(store, d512, b"five")
    expected.add(BlobInfo(d512, 4))
    # Noise that list() must skip: an uncommitted write and a stray short file name.
    async with store.writer(digest_of(b"pending")) as w:
        await w.write(b"pending")
        (store.root / "blobs" / "sha256" / "ab").mkdir(parents=True, exist_ok=True)
        (store.root / "blobs" / "sha256" / "ab" / "abc").write_bytes(b"junk")
        listed = [info async for info in store.list()]
    assert set(listed) == expected
    assert len(listed) == len(expected)


async def test_delete(store: FilesystemBlobStore) -> None:
    d = digest_of(b"bye")
    await put_bytes(store, d, b"bye")
    await store.delete(d)
    assert await store.stat(d) is None
    await store.delete(d)  # idempotent
    assert [i async for i in store.list()] == []
