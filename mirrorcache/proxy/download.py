"""One upstream fetch of a blob into a store writer, readable while it grows.

A :class:`Download` is a fetch detached from the requesting clients: it streams the upstream
body into a store writer (hashing on the way), resumes a broken body with Range requests, and
commits only a verified blob. Readers tail its spool file; the last byte is held back until the
digest is verified, so no client ever receives a complete body whose digest is wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol, runtime_checkable

import structlog

from mirrorcache.errors import ErrorCode, OCIError
from mirrorcache.metrics import Metrics
from mirrorcache.oci.reference import Digest
from mirrorcache.proxy.owners import OwnerStream
from mirrorcache.proxy.routing import Target
from mirrorcache.proxy.upstreams import Upstreams
from mirrorcache.storage.base import (
    BlobStore,
    BlobWriter,
    DigestMismatch,
    FetchClaim,
    LocalTier,
    StorageError,
    VerifiesEarly,
)
from mirrorcache.storage.metadata import MetadataStore, SharedMetadata
from mirrorcache.upstream.client import UpstreamUnavailable
from mirrorcache.upstream.registry import BlobBody, RawBody, UpstreamBodyBroken

if TYPE_CHECKING:
    from mirrorcache.proxy.owners import BlobOpener

log = structlog.get_logger("mirrorcache.blobs")

UPSTREAM_CHUNK = 1 << 20
#: The fast path's buffers (RING_BUFFERS of them): each filled from the upstream socket,
#: then hashed and written to the spool in one go.
DIRECT_BUFFER = 1 << 20
#: Buffers a direct download may have received and not yet written: the receiving thread
#: fills one (and sends it to a lent client) while the writing thread hashes and writes
#: the ones before.
RING_BUFFERS = 3
#: The receiving thread tells readers of this many new bytes at a time (a sendfile each)...
NOTIFY_BYTES = 4 << 20
#: ... or of fewer once this long passed since it last told them.
NOTIFY_SECONDS = 0.02
#: Drop-behind: a direct download lets the page cache of its spool go this far behind its
#: slowest reader (:meth:`ReleasesBehind.release`).
KEEP_BEHIND = 64 << 20
#: After a storage failure, serve straight from upstream for this long before trying again.
BYPASS_SECONDS = 30.0
#: Range requests to resume one broken upstream body before giving up.
MAX_RESUMES = 3

class DownloadFailed(OCIError):
    """An upstream blob fetch failed after the response to some clients had begun."""


class CacheWriteFailed(DownloadFailed):
    """Storage failed under an in-flight download: its readers continue straight from
    upstream (:meth:`BlobService.remainder`) instead of being cut."""


#: ``Download.readers_low`` when nobody reads the spool.
NO_READER = 1 << 62


class DirectSink:
    """Client first: the connection of a reader that has caught up with a download, lent
    to the receiving thread, which sends each new stretch of the body to it straight from
    its receive buffer, before hashing and writing it (the client's bytes then wait for
    neither). Never the blob's last byte (it waits for the digest, as for every reader),
    never beyond ``end``, and never waiting: a socket that does not take a whole stretch
    now ends the loan (the reader, told at once, sends the rest from the spool as before,
    and may lend again once it has caught up), as does any failed send, and at the end the
    reader takes the connection back. ``lock`` is held while the thread sends: once the
    loan has ended (:meth:`end_loan`), the thread never touches the socket again."""

    def __init__(self, sock: socket.socket, spool: int, pos: int, end: int) -> None:
        self.sock = sock
        self.spool = spool
        self.pos = pos
        self.end = end
        self.lent = True
        self.lock = threading.Lock()

    def feed(self, buf: memoryview, at: int, size: int | None) -> int:
        """From the receiving thread: ``buf`` holds the body's bytes from ``at`` (all
        before ``at`` are in the spool). Returns the bytes sent."""
        with self.lock:
            if not self.lent:
                return 0
            began = self.pos
            stop = min(at + len(buf), self.end, (NO_READER if size is None else size) - 1)
            try:
                if self.pos < min(at, stop):  # fell behind: the gap from the spool first
                    self.pos += os.sendfile(self.sock.fileno(), self.spool, self.pos,
                                            min(at, stop) - self.pos)
                if self.pos >= at:
                    view = buf[self.pos - at:stop - at]
                    while view:
                        k = self.sock.send(view)
                        self.pos += k
                        view = view[k:]
            except OSError:  # its socket is full, or the client went away
                pass
            if self.pos < stop:  # not all sent: the reader sends the rest from the spool
                self.lent = False  # (at once: as it would, were upstream to go quiet now)
            return self.pos - began

    def end_loan(self) -> int:
        """From the reader: take the connection back; returns the position reached."""
        with self.lock:
            self.lent = False
            return self.pos


class Download:
    """One in-flight upstream fetch of a blob, readable while it grows."""

    def __init__(self, target: Target, digest: Digest, *, drop_behind: bool = True) -> None:
        self.target = target
        self.digest = digest
        self.size: int | None = None
        self.path: Path | None = None
        self.final_path: Path | None = None
        #: Where the body comes from when not straight from upstream (a cluster owner).
        self.source: BlobOpener | None = None
        self.written = 0
        #: How the body was received: "direct" (a thread off the upstream socket) or "loop".
        self.receive = "loop"
        #: The body now comes through a thread (a caught-up reader may lend it its
        #: connection), not the event loop (a resumed body may come either way).
        self.threaded = False
        self.done = False
        #: The digest checked out (the store is still publishing): every byte may be sent.
        self.verified = False
        self.error: OCIError | None = None
        self.started = asyncio.Event()
        self.finished = asyncio.Event()
        self._changed = asyncio.Event()
        #: Where each reader of the spool has got to (by reader token), and the lowest of
        #: them (read by the receiving thread: an int, replaced whole).
        self._readers: dict[object, int] = {}
        self.readers_low = NO_READER
        #: Let the spool's page cache go behind the slowest reader (``storage.drop_behind``).
        self.drop_behind = drop_behind
        #: The reader whose connection the receiving thread feeds first (DirectSink).
        self.sink: DirectSink | None = None
        #: Bytes sent through sinks (logged at commit).
        self.sink_bytes = 0

    def lendable(self) -> bool:
        """A caught-up reader may lend its connection now (:meth:`lend`)."""
        # A known size: the thread must know which byte is the last (held for the digest).
        return (self.threaded and self.size is not None
                and not (self.sink is not None and self.sink.lent)
                and not (self.done or self.verified) and self.error is None)

    def lend(self, sink: DirectSink) -> bool:
        """Offer a caught-up reader's connection to the receiving thread (one at a time,
        and only while a thread receives)."""
        if not self.lendable():
            return False
        self.sink = sink
        return True

    def reader_at(self, reader: object, pos: int) -> None:
        """A reader of the spool has sent everything before ``pos`` (or starts there)."""
        old = self._readers.get(reader)
        self._readers[reader] = pos
        if pos < self.readers_low:
            self.readers_low = pos
        elif old == self.readers_low:  # the slowest moved on: who is slowest now
            self.readers_low = min(self._readers.values())

    def reader_left(self, reader: object) -> None:
        if self._readers.pop(reader, None) is not None:
            self.readers_low = min(self._readers.values(), default=NO_READER)

    def notify(self) -> None:
        ev, self._changed = self._changed, asyncio.Event()
        ev.set()

    async def changed(self) -> None:
        """Wait for the next news of this download (more bytes, the end, a failure)."""
        ev = self._changed
        if self.error is None and not (self.done or self.verified):
            await ev.wait()

    def readable_until(self) -> int:
        """Bytes a reader may send now: all once verified, else all but the last."""
        if self.done or self.verified:
            return self.written
        if self.size is None:
            return max(self.written - 1, 0)
        return min(self.written, self.size - 1)

    def open_file(self) -> BinaryIO:
        """The spool file (or, once committed, the blob), opened for reading; an open file
        stays valid when the spool is renamed into place."""
        for path in (self.path, self.final_path):
            if path is None:
                continue
            try:
                return open(path, "rb", buffering=0)  # the caller closes it
            except FileNotFoundError:
                continue
        if isinstance(self.error, _StorageFailed):
            raise CacheWriteFailed(self.error.code, self.error.message, status=self.error.status)
        raise DownloadFailed(ErrorCode.BLOB_UNKNOWN, "in-flight blob vanished", status=500)

    async def available(self, pos: int, stop: int) -> int:
        """Wait until bytes past ``pos`` (up to ``stop``) may be sent; return how far.
        Raises DownloadFailed if the download fails first."""
        while True:
            changed = self._changed
            if isinstance(self.error, _StorageFailed):
                raise CacheWriteFailed(self.error.code, self.error.message,
                                       status=self.error.status)
            if self.error is not None:
                raise DownloadFailed(self.error.code, self.error.message,
                                     status=self.error.status)
            limit = min(self.readable_until(), stop)
            if pos < limit or ((self.done or self.verified) and pos >= stop):
                return limit
            if self.done or self.verified:
                raise DownloadFailed(ErrorCode.UNKNOWN, "in-flight blob shorter than announced")
            await changed.wait()


class Downloading:
    """The part of BlobService that fetches a blob into the store (see blobs.py)."""

    _upstreams: Upstreams
    _store: BlobStore
    _meta: MetadataStore
    _metrics: Metrics
    _clock: Callable[[], float]
    _bypass_until: float
    _storage_error: str | None

    async def _download(self, dl: Download, claim: FetchClaim) -> None:
        target, digest = dl.target, dl.digest
        client: BlobOpener = dl.source or self._upstreams[target.upstream]
        started = time.monotonic()
        # Teeing the owner's stream over a shared store: keep the copy in this replica's
        # local tier only; the owner publishes the blob in the shared store.
        local_only = isinstance(client, OwnerStream) and isinstance(self._store, LocalTier)
        try:
            try:
                writer_cm = (self._store.local_writer(digest)
                             if local_only and isinstance(self._store, LocalTier)
                             else self._store.writer(digest))
                w = await writer_cm.__aenter__()
            except StorageError as exc:
                self._storage_failed(exc)
                raise _StorageFailed() from None
            try:
                if w.local_path is None:
                    raise _StorageFailed()
                dl.path = w.local_path
                async with client.open_blob(target.repository, digest) as body:
                    dl.size = body.size
                    claim.publish(w.local_path, dl.size, str(target))
                    dl.started.set()
                    log.info("blob.fetch_started", upstream=target.upstream,
                             repository=target.repository, digest=str(digest), size=dl.size)
                    broke = await _pump(body, w, dl)
                resumes = 0
                while broke is not None and dl.size is not None and resumes < MAX_RESUMES:
                    resumes += 1
                    log.warning("blob.resume", upstream=target.upstream, digest=str(digest),
                                offset=w.size, size=dl.size, attempt=resumes, error=broke)
                    async with client.open_blob(target.repository, digest, w.size) as body:
                        if body.start != w.size:
                            raise UpstreamUnavailable(target.upstream, "could not resume "
                                                      f"after {w.size} bytes (whole body sent)")
                        broke = await _pump(body, w, dl)
                if broke is not None:
                    raise UpstreamUnavailable(target.upstream, f"body broke after {w.size} "
                                              f"bytes: {broke}")
                if dl.size is not None and w.size != dl.size:
                    raise UpstreamUnavailable(target.upstream, f"body ended after {w.size} of "
                                              f"{dl.size} bytes")
                # Linked before the blob becomes visible, so this repository's own requests
                # never need upstream to confirm it (upstream just served it for this one).
                if (local_only and isinstance(client, OwnerStream) and not client.owner_failed
                        and isinstance(self._meta, SharedMetadata)):
                    # The owner linked it in the shared metadata before it verified.
                    self._meta.remember_link(target.upstream, target.repository, digest)
                else:
                    await self._meta.link(target.upstream, target.repository, digest)
                try:
                    if isinstance(w, VerifiesEarly):  # serve while the store publishes
                        await w.verify()
                        dl.verified = True
                        dl.notify()
                    await w.commit()
                except DigestMismatch as exc:
                    log.error("blob.digest_mismatch", upstream=target.upstream,
                              repository=target.repository, expected=str(digest),
                              actual=exc.actual, size=exc.size)
                    raise OCIError(ErrorCode.DIGEST_INVALID,
                                   f"upstream content does not match {digest}",
                                   status=502) from None
            except StorageError as exc:
                self._storage_failed(exc)
                raise _StorageFailed() from None
            finally:
                try:
                    await writer_cm.__aexit__(None, None, None)
                except StorageError as exc:  # cleaning up after a failure failed too
                    log.warning("storage.cleanup_failed", digest=str(digest), error=str(exc))
            dl.size = dl.written
            if dl.final_path is None:  # a local tier: the copy is there now
                dl.final_path = self._store.local_path(digest)
            dl.done = True
            dl.notify()
            self._metrics.upstream_bytes.labels(target.upstream).inc(dl.written)
            log.info("blob.committed", upstream=target.upstream, repository=target.repository,
                     digest=str(digest), bytes=dl.written, receive=dl.receive,
                     client_first=dl.sink_bytes,
                     local_only=local_only,
                     duration_ms=round((time.monotonic() - started) * 1000, 1))
            if local_only and isinstance(client, OwnerStream) and client.owner_failed:
                await self._publish_local(digest)
        except OCIError as exc:
            with contextlib.suppress(StorageError):
                claim.fail({"code": exc.code, "message": exc.message, "status": exc.status})
            raise
        finally:
            claim.release(done=dl.done)

    async def _publish_local(self, digest: Digest) -> None:
        """The owner failed to deliver a blob this replica teed into its local tier only
        (it died, or was unreachable): upload the verified local copy to the shared store
        unless the owner (or another replica) got it there, so the blob does not stay
        outside the shared store for as long as local tiers keep it."""
        assert isinstance(self._store, LocalTier)
        try:
            uploaded = await self._store.publish_local(digest)
        except StorageError as exc:  # the next miss on any replica fetches it again
            log.warning("cluster.publish_failed", digest=str(digest), error=str(exc))
            return
        log.info("cluster.published_after_owner_failed", digest=str(digest), uploaded=uploaded)

    def _storage_failed(self, exc: Exception) -> None:
        self._bypass_until = self._clock() + BYPASS_SECONDS
        self._storage_error = str(exc)
        log.error("storage.write_failed", error=str(exc), bypass_seconds=BYPASS_SECONDS)


@runtime_checkable
class DirectWriter(Protocol):
    """A store writer that can take bytes from a thread, blocking (FsBlobWriter)."""

    def write_direct(self, data: memoryview) -> None: ...


@runtime_checkable
class ReleasesBehind(Protocol):
    """A DirectWriter whose spool's page cache can go behind its readers (FsBlobWriter)."""

    def release(self, until: int) -> None: ...


async def _pump(body: BlobBody, w: BlobWriter, dl: Download) -> str | None:
    """Copy an upstream body into the writer; None when it ended, else why it broke."""
    if isinstance(w, DirectWriter):
        raw = body.raw()
        if raw is not None:
            dl.receive = "direct"
            dl.threaded = True
            return await _pump_direct(raw, w, dl)
    dl.threaded = False
    if dl.sink is not None:  # no thread feeds a lent connection now: its reader takes it back
        dl.sink.end_loan()
    broke: str | None = None
    try:
        async with contextlib.aclosing(body.chunks(UPSTREAM_CHUNK)) as chunks:
            async for chunk in chunks:
                await w.write(chunk)
                if w.size != dl.written:
                    dl.written = w.size
                    dl.notify()
    except UpstreamBodyBroken as exc:
        broke = exc.reason
    await w.flush()
    dl.written = w.size
    dl.notify()
    if broke is None and dl.size is not None and w.size < dl.size:
        broke = "short body"
    return broke


async def _pump_direct(raw: RawBody, w: BlobWriter, dl: Download) -> str | None:
    """The fast path of :func:`_pump`: one thread receives the body straight from the
    upstream socket into a ring of buffers (feeding a lent client, :class:`DirectSink`),
    another hashes and writes each buffer in order (hashlib and the syscalls release the
    GIL); the event loop only hears "the spool grew" every NOTIFY_BYTES (or
    NOTIFY_SECONDS), when a loan ends, and once more at the end."""
    await w.flush()
    assert isinstance(w, DirectWriter)
    loop = asyncio.get_running_loop()
    finished: asyncio.Future[str | None] = loop.create_future()
    pending = threading.Event()  # a progress call is queued on the loop

    def progress() -> None:
        pending.clear()
        if w.size != dl.written:
            dl.written = w.size
            dl.notify()

    def finish(result: str | BaseException | None) -> None:
        if finished.done():
            return
        if isinstance(result, BaseException):
            finished.set_exception(result)
        else:
            finished.set_result(result)

    told = [w.size, 0.0]  # what readers were last told of, and when

    def tell(now: bool = False) -> None:
        """Readers hear of NOTIFY_BYTES at a time (each wake-up is a sendfile), or of less
        once NOTIFY_SECONDS passed (a slow upstream), or ``now`` (a loan ended); the end
        is told when the threads are done. From either thread."""
        if ((now or w.size - told[0] >= NOTIFY_BYTES
             or time.monotonic() - told[1] >= NOTIFY_SECONDS) and not pending.is_set()):
            told[:] = [w.size, time.monotonic()]
            pending.set()
            loop.call_soon_threadsafe(progress)

    release = w.release if dl.drop_behind and isinstance(w, ReleasesBehind) else None
    ring = _Ring(RING_BUFFERS, DIRECT_BUFFER)

    def write() -> None:
        """The writing thread: hashes and writes each stretch the receiving one hands over,
        in order, while that one receives (and sends to a lent client) the next."""
        try:
            while (item := ring.take()) is not None:
                view, n, ended = item
                try:
                    w.write_direct(view[:n])
                finally:
                    ring.give_back(view)
                if release is not None:
                    release(min(dl.readers_low, w.size) - KEEP_BEHIND)
                # A loan ended in this stretch: its reader goes on from the spool, inside it.
                tell(now=ended)
        except BaseException as exc:  # StorageError, or a bug: the loop side raises it
            ring.fail(exc)
            raw.abort()  # the receiving thread may wait on a silent upstream: wake it

    def run() -> None:
        """The receiving thread."""
        result: str | BaseException | None = None
        writer = threading.Thread(target=write, name=f"mirrorcache-fetch-{dl.digest.hex[:12]}-w",
                                  daemon=True)
        received = w.size
        try:
            writer.start()  # may fail (no thread left): the loop side raises it
            while raw.remaining:
                view = ring.acquire()
                if view is None:  # the writing thread failed
                    break
                try:
                    n = raw.recv_into(view)
                except BaseException:
                    ring.give_back(view)
                    raise
                sink = dl.sink
                ended = False  # a loan ended: told now, and again once this stretch is written
                if sink is not None and sink.lent:
                    if sink.pos < received:  # a gap the spool must hold first
                        ring.drained()
                    dl.sink_bytes += sink.feed(view[:n], received, dl.size)
                    if not sink.lent:
                        ended = True
                        tell(now=True)
                received += n
                ring.submit(view, n, ended)
        except UpstreamBodyBroken as exc:
            result = exc.reason
        except BaseException as exc:  # a bug: the loop side raises it
            result = exc
        finally:
            ring.close()  # what was received is still written
            if writer.ident is not None:  # started
                writer.join()
            ring.release()
        if ring.error is not None:
            result = ring.error
        with contextlib.suppress(RuntimeError):  # the loop is closing: nobody waits
            loop.call_soon_threadsafe(finish, result)

    thread = threading.Thread(target=run, name=f"mirrorcache-fetch-{dl.digest.hex[:12]}",
                              daemon=True)
    thread.start()
    try:
        broke = await finished
    finally:
        if thread.is_alive():  # cancelled: stop the threads before the writer is closed
            raw.abort()
            # Off the loop: the thread may be waiting on the loop (the space guard's check).
            # Cancelled again meanwhile, still wait: the writing thread may have a few MiB
            # queued, and the store writer must not be closed under it.
            join = asyncio.ensure_future(asyncio.to_thread(thread.join))
            while not join.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(join)
    dl.written = w.size
    dl.notify()
    return broke


class _Ring:
    """The buffers between a download's receiving thread and its writing thread: page-aligned
    anonymous maps (like the page-cache folios the kernel copies them into), handed over in
    order; at most ``count`` in use, so a download holds ``count * size`` bytes."""

    def __init__(self, count: int, size: int) -> None:
        self._areas = [mmap.mmap(-1, size) for _ in range(count)]
        self._free = deque(memoryview(a) for a in self._areas)
        self._full: deque[tuple[memoryview, int, bool]] = deque()
        self._count = count
        self._closed = False
        self.error: BaseException | None = None
        self._cond = threading.Condition()

    def acquire(self) -> memoryview | None:
        """A free buffer (waits for one); None once the writing thread has failed."""
        with self._cond:
            while not self._free and self.error is None:
                self._cond.wait()
            return self._free.popleft() if self.error is None else None

    def submit(self, view: memoryview, n: int, ended: bool = False) -> None:
        """Hand ``n`` received bytes to the writing thread (``ended``: a loan ended in
        them, to be told once they are written)."""
        with self._cond:
            if self.error is not None:  # the writing thread failed: never written
                self._free.append(view)
            else:
                self._full.append((view, n, ended))
            self._cond.notify_all()

    def take(self) -> tuple[memoryview, int, bool] | None:
        """The next stretch to write (waits for one); None once closed and all written."""
        with self._cond:
            while not self._full and not self._closed:
                self._cond.wait()
            return self._full.popleft() if self._full else None

    def give_back(self, view: memoryview) -> None:
        with self._cond:
            self._free.append(view)
            self._cond.notify_all()

    def drained(self) -> None:
        """Wait until every stretch handed over is written (the caller holds one buffer)."""
        with self._cond:
            while (len(self._free) < self._count - 1 or self._full) and self.error is None:
                self._cond.wait()

    def fail(self, exc: BaseException) -> None:
        with self._cond:
            self.error = exc
            self._free.extend(view for view, _, _ in self._full)  # never written now
            self._full.clear()
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def release(self) -> None:
        for view in self._free:
            view.release()
        for area in self._areas:
            with contextlib.suppress(BufferError):
                area.close()


class _LocalClaim:
    """The claim of a process whose store has no FetchClaims: nobody else to tell."""

    def publish(self, spool: Path | None, size: int | None, owner: str | None = None) -> None:
        pass

    def fail(self, error: dict[str, Any]) -> None:
        pass

    def release(self, *, done: bool) -> None:
        pass


class _StorageFailed(OCIError):
    def __init__(self) -> None:
        super().__init__(ErrorCode.UNAVAILABLE, "storage failed", status=503)
