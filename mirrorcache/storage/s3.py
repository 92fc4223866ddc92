"""S3 blob store: a local spool readers can tail, a bounded multipart upload, verify-then-complete.

Key layout: storage/keys.py. A blob is written to a spool file on local disk (clients tail it
as with the filesystem backend) and, part by part as the spool grows, to a multipart upload
of the blob's final key. Parts are read back from the spool, so memory per write is at most
``max_parallel_parts * part_size``. ``commit`` verifies the digest first and only then calls
``CompleteMultipartUpload`` (a blob smaller than one part: one ``PutObject``); a mismatch or a
cancel aborts the upload. A pending multipart upload is never visible as an object, so a
half-written object never appears under a blob key; :meth:`S3BlobStore.abort_stale_uploads`
aborts the ones a crashed process left behind.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import hashlib
import os
import secrets
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import aiohttp
import structlog
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession, get_session
from botocore.exceptions import BotoCoreError, ClientError
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)

from mirrorcache.config import S3StorageConfig
from mirrorcache.oci.reference import Digest
from mirrorcache.storage import keys
from mirrorcache.storage.base import BlobInfo, BlobNotFound, DigestMismatch, StorageError

log = structlog.get_logger("mirrorcache.storage.s3")

READ_CHUNK = 1 << 20
#: Bytes gathered in memory before they are appended to the spool in a worker thread.
SPOOL_BATCH = 1 << 20
#: Attempts and overall time for one S3 call (tenacity; botocore's own retries are off).
S3_ATTEMPTS = 4
S3_RETRY_TIME = 20.0
#: A streamed GET that breaks mid-body is resumed with a ranged GET this many times.
READ_RESUMES = 3
_NOT_FOUND = ("404", "NoSuchKey", "NotFound")
_RETRY_CODES = frozenset({"500", "502", "503", "504", "InternalError", "ServiceUnavailable",
                          "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                          "RequestTimeTooSkewed"})
T = TypeVar("T")


def _error_code(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        return str(err.get("Code") or exc.response.get("ResponseMetadata", {})
                   .get("HTTPStatusCode", ""))
    return ""


def is_not_found(exc: BaseException) -> bool:
    return _error_code(exc) in _NOT_FOUND


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, ClientError):
        return _error_code(exc) in _RETRY_CODES
    return isinstance(exc, BotoCoreError | aiohttp.ClientError | OSError | TimeoutError)


def describe(exc: BaseException) -> str:
    """An S3 failure in words, without request ids or credentials."""
    if isinstance(exc, ClientError):
        return f"S3 answered {_error_code(exc)}"
    return f"{type(exc).__name__} talking to S3"


class S3BlobWriter:
    """One blob on its way to S3 (see the module docstring); ``local_path`` is the spool."""

    def __init__(self, store: S3BlobStore, digest: Digest, spool: Path) -> None:
        self.digest = digest
        self._store = store
        self._key = store.key_of(digest)
        self._hash = hashlib.new(digest.algorithm)
        self._path = spool
        self._fd = os.open(spool, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        self._written = 0
        self._buf: list[bytes] = []
        self._buf_len = 0
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self._next_part = 1
        self._inflight: deque[asyncio.Task[dict[str, Any]]] = deque()
        self._closed = False
        self.finished = False

    @property
    def size(self) -> int:
        return self._written

    @property
    def local_path(self) -> Path | None:
        return self._path

    @property
    def upload_id(self) -> str | None:
        return self._upload_id

    def _append(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self._hash.update(chunk)
        data = b"".join(chunks) if len(chunks) > 1 else chunks[0]
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
        self._written += len(data)

    async def write(self, chunk: bytes) -> None:
        if self._closed:
            raise StorageError("write after close")
        if not chunk:
            return
        self._buf.append(chunk)
        self._buf_len += len(chunk)
        if self._buf_len >= SPOOL_BATCH:
            await self.flush()
            await self._upload_ready_parts(final=False)

    async def flush(self) -> None:
        """Append what is buffered to the spool (``size`` then counts it)."""
        if not self._buf:
            return
        buf, self._buf, self._buf_len = self._buf, [], 0
        try:
            await asyncio.to_thread(self._append, buf)
        except OSError as exc:
            raise StorageError(f"spooling {self.digest}: {exc.strerror}") from exc

    def _reap(self) -> None:
        """Collect finished part uploads (a failed one raises its StorageError)."""
        running: deque[asyncio.Task[dict[str, Any]]] = deque()
        for task in self._inflight:
            if task.done():
                self._parts.append(task.result())
            else:
                running.append(task)
        self._inflight = running

    async def _upload_ready_parts(self, *, final: bool) -> None:
        """Start uploads of the complete parts in the spool, at most ``max_parallel_parts``
        at once. While writing this never waits for S3 (the spool holds what is not yet
        uploaded, so upstream and clients go at their own speed) and keeps one part in
        flight, so the upload trails the fetch without competing with it; ``final`` (after
        the digest verified) uploads the rest ``max_parallel_parts`` at a time and waits for
        every part."""
        part_size = self._store.cfg.part_size
        limit = self._store.cfg.max_parallel_parts if final else 1
        while True:
            self._reap()
            if not final and len(self._inflight) >= limit:
                return
            start = (self._next_part - 1) * part_size
            available = self._written - start
            if available <= 0 or (available < part_size and not final):
                return
            if self._upload_id is None:
                resp = await self._store.call("create_multipart_upload", Key=self._key,
                                              **self._store.write_args())
                self._upload_id = str(resp["UploadId"])
            number, length = self._next_part, min(available, part_size)
            self._next_part += 1
            self._inflight.append(asyncio.create_task(self._upload_part(number, start, length)))
            while final and len(self._inflight) >= limit:
                self._parts.append(await self._inflight.popleft())

    async def _upload_part(self, number: int, start: int, length: int) -> dict[str, Any]:
        body = await asyncio.to_thread(os.pread, self._fd, length, start)
        resp = await self._store.call("upload_part", Key=self._key, UploadId=self._upload_id,
                                      PartNumber=number, Body=body)
        return {"PartNumber": number, "ETag": resp["ETag"]}

    async def commit(self) -> BlobInfo:
        info = await self.commit_keep_spool()
        self._unlink()
        return info

    async def verify(self) -> None:
        """Flush and check the digest (see :class:`~mirrorcache.storage.base.VerifiesEarly`);
        the upload goes on, ``commit`` completes it."""
        try:
            await self.flush()
        except BaseException:
            await self.cancel()
            raise
        actual = self._hash.hexdigest()
        if actual != self.digest.hex:
            await self.cancel()
            log.warning("blob.digest_mismatch", digest=str(self.digest), backend="s3",
                        actual=f"{self.digest.algorithm}:{actual}", bytes=self._written)
            raise DigestMismatch(self.digest, f"{self.digest.algorithm}:{actual}", self._written)

    async def commit_keep_spool(self) -> BlobInfo:
        """Commit, leaving the verified spool file at ``local_path`` (the tiered store moves
        it into its local tier)."""
        await self.verify()
        try:
            if self._upload_id is None:
                body = await asyncio.to_thread(os.pread, self._fd, self._written, 0)
                await self._store.call("put_object", Key=self._key, Body=body,
                                       **self._store.write_args())
            else:
                await self._upload_ready_parts(final=True)
                while self._inflight:
                    self._parts.append(await self._inflight.popleft())
                await self._store.call(
                    "complete_multipart_upload", Key=self._key, UploadId=self._upload_id,
                    MultipartUpload={"Parts": sorted(self._parts,
                                                     key=lambda p: int(p["PartNumber"]))})
        except BaseException:
            await self.cancel()
            raise
        self._close()
        self.finished = True
        log.info("blob.committed", digest=str(self.digest), backend="s3", bytes=self._written,
                 parts=len(self._parts) or 1)
        return BlobInfo(self.digest, self._written)

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._fd)

    def _unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path.unlink()

    async def cancel(self) -> None:
        """Stop part uploads, abort the multipart upload, remove the spool."""
        self.finished = True
        tasks, self._inflight = list(self._inflight), deque()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        upload_id, self._upload_id = self._upload_id, None
        if upload_id is not None:
            try:
                await self._store.call("abort_multipart_upload", Key=self._key,
                                       UploadId=upload_id)
            except StorageError as exc:  # the janitor gets it later
                log.warning("storage.s3_abort_failed", digest=str(self.digest),
                            reason=str(exc))
        self._close()
        self._unlink()


class S3BlobStore:
    """Blobs in an S3 bucket under a prefix; ``async with S3BlobStore(cfg, spool_dir)``.

    The one aiobotocore client is opened on entry and closed on exit by whoever owns the
    store (the app's cleanup context). ``session`` defaults to a fresh aiobotocore session
    (the default credential chain, with ``cfg.profile`` if set).
    """

    def __init__(self, cfg: S3StorageConfig, spool_dir: Path,
                 session: AioSession | None = None) -> None:
        self.cfg = cfg
        self.prefix = keys.s3_prefix(cfg.prefix)
        self.spool_dir = spool_dir
        self._session = session
        self._stack: AsyncExitStack | None = None
        self._client: Any = None

    async def __aenter__(self) -> S3BlobStore:
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        session = self._session
        if session is None:
            session = AioSession(profile=self.cfg.profile) if self.cfg.profile else get_session()
        config = AioConfig(
            s3={"addressing_style": self.cfg.addressing_style},
            retries={"max_attempts": 1, "mode": "standard"},  # tenacity retries, bounded
            max_pool_connections=max(10, 4 * self.cfg.max_parallel_parts),
            connect_timeout=10, read_timeout=60, signature_version="s3v4",
        )
        stack = AsyncExitStack()
        self._client = await stack.enter_async_context(session.create_client(
            "s3", region_name=self.cfg.region, endpoint_url=self.cfg.endpoint_url,
            config=config))
        self._stack = stack
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    @property
    def client(self) -> Any:
        """The aiobotocore S3 client (for the metadata store sharing it)."""
        if self._client is None:
            raise StorageError("S3 store used outside its 'async with'")
        return self._client

    def key_of(self, digest: Digest) -> str:
        return keys.s3_blob_key(self.prefix, digest)

    def write_args(self) -> dict[str, str]:
        """SSE and storage class, on every write."""
        args: dict[str, str] = {}
        if self.cfg.sse:
            args["ServerSideEncryption"] = self.cfg.sse
        if self.cfg.kms_key_id:
            args["SSEKMSKeyId"] = self.cfg.kms_key_id
        if self.cfg.storage_class:
            args["StorageClass"] = self.cfg.storage_class
        return args

    async def call(self, operation: str, **kwargs: Any) -> Any:
        """One S3 operation on the bucket, retried (bounded) on throttling, 5xx and network
        errors; a failure becomes StorageError (not-found: BlobNotFound)."""
        return await self.retrying(lambda: getattr(self.client, operation)(
            Bucket=self.cfg.bucket, **kwargs), operation)

    async def retrying(self, fn: Callable[[], Awaitable[T]], operation: str) -> T:
        retrying = AsyncRetrying(
            stop=stop_after_attempt(S3_ATTEMPTS) | stop_after_delay(S3_RETRY_TIME),
            wait=wait_exponential_jitter(multiplier=0.05, max=2.0, jitter=0.1),
            retry=retry_if_exception(_retryable),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await fn()
        except (ClientError, BotoCoreError, aiohttp.ClientError, OSError, TimeoutError) as exc:
            if is_not_found(exc):
                raise BlobNotFound(operation) from None
            log.warning("storage.s3_failed", operation=operation, reason=describe(exc))
            raise StorageError(f"S3 {operation}: {describe(exc)}") from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def check(self) -> None:
        """Raise StorageError unless the bucket answers (for /readyz)."""
        await self.call("head_bucket")

    async def stat(self, digest: Digest) -> BlobInfo | None:
        try:
            resp = await self.call("head_object", Key=self.key_of(digest))
        except BlobNotFound:
            return None
        return BlobInfo(digest, int(resp["ContentLength"]))

    def local_path(self, digest: Digest) -> Path | None:
        return None

    @asynccontextmanager
    async def writer(self, digest: Digest) -> AsyncIterator[S3BlobWriter]:
        name = keys.temp_prefix(digest) + secrets.token_hex(6) + keys.TMP_SUFFIX
        try:
            w = S3BlobWriter(self, digest, self.spool_dir / name)
        except OSError as exc:
            raise StorageError(f"creating spool file: {exc.strerror}") from exc
        try:
            yield w
        finally:
            if not w.finished:
                await w.cancel()

    async def reader(self, digest: Digest, offset: int = 0, length: int | None = None
                     ) -> AsyncIterator[bytes]:
        """Ranged GETs streamed in ``READ_CHUNK`` pieces; a broken body resumes where it
        stopped. Raises BlobNotFound."""
        key = self.key_of(digest)
        pos = offset
        end = None if length is None else offset + length
        resumes = 0
        while end is None or pos < end:
            args: dict[str, Any] = {"Key": key}
            if pos > 0 or end is not None:
                args["Range"] = f"bytes={pos}-" + ("" if end is None else str(end - 1))
            try:
                resp = await self.call("get_object", **args)
            except BlobNotFound:
                raise BlobNotFound(str(digest)) from None
            except StorageError:
                if pos > 0 and resumes == 0 and await self._past_end(digest, pos):
                    return
                raise
            body = resp["Body"]
            try:
                while True:
                    data = await body.read(READ_CHUNK)
                    if not data:
                        return
                    pos += len(data)
                    yield data
                    if end is not None and pos >= end:
                        return
            except (aiohttp.ClientError, BotoCoreError, OSError, TimeoutError) as exc:
                resumes += 1
                if resumes > READ_RESUMES:
                    raise StorageError(f"S3 read of {digest}: {describe(exc)}") from None
                log.warning("storage.s3_read_resumed", digest=str(digest), offset=pos)
            finally:
                body.close()

    async def _past_end(self, digest: Digest, pos: int) -> bool:
        """A ranged GET failed: true if that is only because ``pos`` is at or past the end
        (S3 answers 416 InvalidRange there)."""
        info = await self.stat(digest)
        if info is None:
            raise BlobNotFound(str(digest))
        return pos >= info.size

    async def delete(self, digest: Digest) -> None:
        with contextlib.suppress(BlobNotFound):
            await self.call("delete_object", Key=self.key_of(digest))

    async def list(self) -> AsyncIterator[BlobInfo]:
        token: str | None = None
        base = self.prefix + keys.BLOBS_DIR + "/"
        while True:
            args: dict[str, Any] = {"Prefix": base}
            if token:
                args["ContinuationToken"] = token
            resp = await self.call("list_objects_v2", **args)
            for obj in resp.get("Contents", []):
                digest = keys.digest_of_key(str(obj["Key"])[len(self.prefix):])
                if digest is not None:
                    yield BlobInfo(digest, int(obj["Size"]))
            if not resp.get("IsTruncated"):
                return
            token = resp.get("NextContinuationToken")

    async def pending_uploads(self) -> builtins.list[dict[str, Any]]:
        """Multipart uploads in progress under the blob keys (``Key``, ``UploadId``,
        ``Initiated``)."""
        uploads: builtins.list[dict[str, Any]] = []
        args: dict[str, Any] = {"Prefix": self.prefix + keys.BLOBS_DIR + "/"}
        while True:
            resp = await self.call("list_multipart_uploads", **args)
            uploads.extend(resp.get("Uploads", []))
            if not resp.get("IsTruncated"):
                return uploads
            args["KeyMarker"] = resp.get("NextKeyMarker")
            args["UploadIdMarker"] = resp.get("NextUploadIdMarker")

    async def abort_stale_uploads(self, older_than: float,
                                  now: datetime | None = None) -> int:
        """The janitor: abort multipart uploads under the prefix started more than
        ``older_than`` seconds ago (leftovers of a crashed process); return how many.

        Run it at start-up and then periodically with an age well above the longest blob
        download (an hour, say), so no live upload of another replica is aborted.
        """
        now = now or datetime.now(UTC)
        aborted = 0
        for up in await self.pending_uploads():
            initiated = up.get("Initiated")
            if isinstance(initiated, datetime) and (now - initiated).total_seconds() < older_than:
                continue
            with contextlib.suppress(BlobNotFound):
                await self.call("abort_multipart_upload", Key=up["Key"], UploadId=up["UploadId"])
                aborted += 1
        if aborted:
            log.info("storage.s3_uploads_aborted", uploads=aborted)
        return aborted

    async def presigned_url(self, digest: Digest, expires: float) -> str:
        """A GET URL for the blob valid ``expires`` seconds (redirect mode)."""
        url = await self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.cfg.bucket, "Key": self.key_of(digest)},
            ExpiresIn=int(expires))
        return str(url)
