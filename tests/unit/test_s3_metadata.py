"""Shared metadata in S3 (moto server process): two replicas and a fresh one see the same
tags and links within the freshness window; S3 trouble falls back to the last copy."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mirrorcache.config import S3StorageConfig
from mirrorcache.oci.reference import Digest
from mirrorcache.storage.metadata import Metadata, MetadataStore, SharedMetadata, TagRecord
from mirrorcache.storage.s3 import S3BlobStore
from mirrorcache.storage.s3_metadata import S3Metadata
from tests.support.countingproxy import CountingProxy, Fault
from tests.support.s3server import REGION, MotoServer, aws_session, make_bucket
from tests.support.waiting import wait_until

D1 = Digest("sha256", "1" * 64)
D2 = Digest("sha256", "2" * 64)
MT = "application/vnd.oci.image.manifest.v1+json"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def s3(tmp_path: Path, moto_server: MotoServer) -> AsyncIterator[tuple[S3BlobStore,
                                                                          CountingProxy]]:
    bucket = await make_bucket(moto_server)
    async with CountingProxy(moto_server.url) as proxy:
        cfg = S3StorageConfig(bucket=bucket, prefix="m", region=REGION, endpoint_url=proxy.url,
                              addressing_style="path")
        async with S3BlobStore(cfg, tmp_path / "spool", session=aws_session()) as store:
            yield store, proxy


def gets(proxy: CountingProxy) -> int:
    return sum(1 for r in proxy.requests if r.method == "GET" and "/metadata/" in r.path)


async def test_replicas_share_tags_links_and_media_types(
        s3: tuple[S3BlobStore, CountingProxy]) -> None:
    store, proxy = s3
    clock = Clock()
    a = S3Metadata(store, ttl=5.0, clock=clock)
    b = S3Metadata(store, ttl=5.0, clock=clock)
    rec = TagRecord(D1, MT, 1234, time.time())
    await a.set_tag("docker.io", "library/alpine", "3.20", rec)
    await a.link("docker.io", "library/alpine", D1)
    await a.set_media_type("docker.io", "library/alpine", D1, MT)
    assert a.get_tag("docker.io", "library/alpine", "3.20") == rec  # own writes: at once

    assert b.get_tag("docker.io", "library/alpine", "3.20") is None  # sync: LRU only
    assert await b.aget_tag("docker.io", "library/alpine", "3.20") == rec
    assert await b.ais_linked("docker.io", "library/alpine", D1)
    assert not await b.ais_linked("docker.io", "library/other", D1)
    assert await b.aget_media_type("docker.io", "library/alpine", D1) == MT
    assert b.get_tag("docker.io", "library/alpine", "3.20") == rec  # now in b's LRU
    assert b.is_linked("docker.io", "library/alpine", D1)

    # b trusts its copy for ttl, then asks S3 again and sees a's newer record
    newer = TagRecord(D2, MT, 99, time.time())
    await a.set_tag("docker.io", "library/alpine", "3.20", newer)
    before = gets(proxy)
    assert await b.aget_tag("docker.io", "library/alpine", "3.20") == rec
    assert gets(proxy) == before
    clock.now += 5.1
    assert await b.aget_tag("docker.io", "library/alpine", "3.20") == newer
    assert gets(proxy) == before + 1
    # links and media types are immutable once seen: no GET after ttl
    assert await b.ais_linked("docker.io", "library/alpine", D1)
    assert await b.aget_media_type("docker.io", "library/alpine", D1) == MT
    assert gets(proxy) == before + 1

    # a fresh replica (a new pod, upstream down or not) finds the last known tag in S3
    fresh = S3Metadata(store)
    assert await fresh.aget_tag("docker.io", "library/alpine", "3.20") == newer
    assert await fresh.aget_tag("docker.io", "library/alpine", "nope") is None


async def test_negative_answers_are_cached_for_ttl_and_gets_are_single_flight(
        s3: tuple[S3BlobStore, CountingProxy]) -> None:
    store, proxy = s3
    clock = Clock()
    m = S3Metadata(store, ttl=5.0, clock=clock)
    results = await asyncio.gather(*(m.aget_tag("quay.io", "x/y", "t") for _ in range(10)))
    assert results == [None] * 10 and gets(proxy) == 1
    assert not await m.ais_linked("quay.io", "x/y", D1) and gets(proxy) == 2
    assert not await m.ais_linked("quay.io", "x/y", D1) and gets(proxy) == 2
    other = S3Metadata(store, clock=clock)
    await other.link("quay.io", "x/y", D1)
    assert not await m.ais_linked("quay.io", "x/y", D1)  # absence trusted for ttl
    clock.now += 6
    assert await m.ais_linked("quay.io", "x/y", D1)


async def test_touch_is_written_hourly_and_read_back(
        s3: tuple[S3BlobStore, CountingProxy]) -> None:
    store, proxy = s3
    wall = Clock()
    wall.now = 1_000_000.0
    m = S3Metadata(store, wall=wall)
    await m.touch(D1)
    wall.now += 60
    await m.touch(D1)
    puts = [r for r in proxy.requests if r.method == "PUT" and "/metadata/atime/" in r.path]
    assert len(puts) == 1
    assert await S3Metadata(store).alast_access(D1) == 1_000_000.0


async def test_s3_down_falls_back_to_the_last_copy(tmp_path: Path,
                                                   moto_server: MotoServer) -> None:
    bucket = await make_bucket(moto_server)
    proxy = CountingProxy(moto_server.url)
    await proxy.start()
    cfg = S3StorageConfig(bucket=bucket, region=REGION, endpoint_url=proxy.url,
                          addressing_style="path")
    clock = Clock()
    rec = TagRecord(D1, MT, 5, time.time())
    async with S3BlobStore(cfg, tmp_path / "spool", session=aws_session()) as store:
        m = S3Metadata(store, ttl=1.0, clock=clock)
        await m.set_tag("docker.io", "a/b", "t", rec)
        await proxy.close()  # S3 unreachable from now on
        clock.now += 2
        assert await m.aget_tag("docker.io", "a/b", "t") == rec  # stale, but known
        assert await m.aget_tag("docker.io", "a/b", "other") is None
        await m.set_tag("docker.io", "a/b", "u", rec)  # logged, kept locally, no raise
        assert m.get_tag("docker.io", "a/b", "u") == rec


async def test_both_metadata_stores_have_one_async_interface(
        tmp_path: Path, s3: tuple[S3BlobStore, CountingProxy]) -> None:
    stores: list[MetadataStore] = [Metadata(tmp_path / "meta"), S3Metadata(s3[0])]
    for meta in stores:
        rec = TagRecord(D1, MT, 5, time.time())
        await meta.set_tag("docker.io", "a/b", "t", rec)
        await meta.link("docker.io", "a/b", D1)
        await meta.set_media_type("docker.io", "a/b", D1, MT)
        assert await meta.aget_tag("docker.io", "a/b", "t") == rec
        assert await meta.ais_linked("docker.io", "a/b", D1)
        assert not await meta.ais_linked("docker.io", "a/c", D1)
        assert await meta.aget_media_type("docker.io", "a/b", D1) == MT
        assert await meta.aget_media_type("docker.io", "a/c", D1) is None  # per repository
        await meta.drop_tag("docker.io", "a/b", "t", D2)  # points elsewhere: kept
        assert await meta.aget_tag("docker.io", "a/b", "t") == rec
        await meta.drop_tag("docker.io", "a/b", "t", D1)
        await meta.forget("docker.io", "a/b", D1)
        assert await meta.aget_tag("docker.io", "a/b", "t") is None
        assert not await meta.ais_linked("docker.io", "a/b", D1)
        assert meta.problem() is None
        meta.close()


async def test_remembered_records_are_not_written_and_expire_to_the_shared_one(
        s3: tuple[S3BlobStore, CountingProxy]) -> None:
    """A replica taking the owner's answer keeps it locally (no PUT); after ``ttl`` it reads
    the shared record the owner wrote."""
    store, proxy = s3
    clock = Clock()
    owner = S3Metadata(store, ttl=5.0, clock=clock)
    other = S3Metadata(store, ttl=5.0, clock=clock)
    assert isinstance(other, SharedMetadata)
    assert not hasattr(Metadata, "remember_tag")  # one host: nothing to share
    shared = TagRecord(D1, MT, 10, time.time() - 1)
    await owner.set_tag("docker.io", "r", "v1", shared)
    await owner.link("docker.io", "r", D1)
    proxy.reset()
    mine = TagRecord(D1, MT, 10, time.time())
    other.remember_tag("docker.io", "r", "v1", mine)
    other.remember_link("docker.io", "r", D2)
    assert [r for r in proxy.requests if r.method == "PUT"] == []
    assert await other.aget_tag("docker.io", "r", "v1") == mine
    assert await other.ais_linked("docker.io", "r", D2)
    assert gets(proxy) == 0  # all from the LRU
    clock.now += 5.1
    assert await other.aget_tag("docker.io", "r", "v1") == shared


@pytest.fixture
async def dripping_s3(tmp_path: Path, moto_server: MotoServer
                      ) -> AsyncIterator[tuple[S3BlobStore, CountingProxy]]:
    """S3 behind a proxy that sends bodies 16 bytes at a time."""
    bucket = await make_bucket(moto_server)
    async with CountingProxy(moto_server.url, chunk_size=16) as proxy:
        cfg = S3StorageConfig(bucket=bucket, prefix="m", region=REGION, endpoint_url=proxy.url,
                              addressing_style="path")
        async with S3BlobStore(cfg, tmp_path / "spool", session=aws_session()) as store:
            yield store, proxy


async def test_a_record_arriving_in_pieces_is_read_whole(
        dripping_s3: tuple[S3BlobStore, CountingProxy]) -> None:
    store, proxy = dripping_s3
    rec = TagRecord(D1, MT, 1234, time.time())
    await S3Metadata(store).set_tag("docker.io", "library/alpine", "3.20", rec)
    proxy.add_fault(Fault.slow(0.005, method="GET", path="/metadata/"))
    fresh = S3Metadata(store)
    assert await fresh.aget_tag("docker.io", "library/alpine", "3.20") == rec
    assert gets(proxy) == 1


async def test_a_cancelled_reader_does_not_cancel_the_others(
        s3: tuple[S3BlobStore, CountingProxy]) -> None:
    store, proxy = s3
    rec = TagRecord(D1, MT, 1234, time.time())
    await S3Metadata(store).set_tag("docker.io", "library/alpine", "3.20", rec)
    gate = asyncio.Event()
    proxy.add_fault(Fault.hold(gate, method="GET", path="/metadata/"))
    m = S3Metadata(store)
    first = asyncio.ensure_future(m.aget_tag("docker.io", "library/alpine", "3.20"))
    await wait_until(lambda: gets(proxy) == 1)
    second = asyncio.ensure_future(m.aget_tag("docker.io", "library/alpine", "3.20"))
    await asyncio.sleep(0)  # the second reader is waiting on the same GET
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    gate.set()
    assert await second == rec
    assert gets(proxy) == 1
