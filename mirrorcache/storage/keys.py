"""The content-addressed layout, in one place.

Filesystem backend, under the configured root::

    <root>/blobs/<algorithm>/<first two hex>/<hex>    committed content (layers, configs,
                                                      manifests), immutable, written once
    <root>/tmp/<algorithm>-<hex>.<random>.part        an in-progress write; renamed into
                                                      blobs/ only after its digest verified;
                                                      anything here at start-up is a crash
                                                      leftover and is deleted
    <root>/tmp/<algorithm>-<hex>.lock                 the claim on fetching a blob (flock'd by
                                                      the fetching process; JSON: spool path,
                                                      size, owner, or the error)
    <root>/tmp/claim-<sha256 of key>.lock             any other claim (a manifest, a tag)
    <root>/metadata/                                  diskcache (sqlite): tag -> digest records,
                                                      manifest media types, repository links,
                                                      last access times

Object storage (S3), under the configured ``prefix`` (``""`` or ending in ``/``)::

    <prefix>blobs/<algorithm>/<first two hex>/<hex>   committed content, the same relative key
                                                      as on disk; written by one PutObject
                                                      (small) or CompleteMultipartUpload, both
                                                      only after the digest verified, so an
                                                      object under this key is always whole
    (pending multipart uploads to those keys)         in-progress writes; invisible as objects;
                                                      leftovers of a crash are aborted by the
                                                      janitor (S3BlobStore.abort_stale_uploads)
    <prefix>metadata/tags/<upstream>/<repo>:<tag>     JSON tag record (digest, media type, size,
                                                      checked_at); ``:`` never occurs in a
                                                      repository name, ``/`` never in a tag
    <prefix>metadata/links/<upstream>/<repo>@<alg>:<hex>   repository link (JSON, linked_at)
    <prefix>metadata/mediatypes/<alg>/<hex>          JSON manifest media type
    <prefix>metadata/atime/<alg>/<hex>               JSON last access time (coarse, hourly)

The S3 writer spools to ``<spool dir>/<algorithm>-<hex>.<random>.part`` on local disk while
it uploads (readers tail that file); with a local tier the spool directory is the tier's
``tmp/`` and the spool is renamed into the tier's ``blobs/`` at commit.
"""

from __future__ import annotations

import hashlib
from pathlib import PurePosixPath

from mirrorcache.errors import OCIError
from mirrorcache.oci.reference import Digest

BLOBS_DIR = "blobs"
TMP_DIR = "tmp"
TMP_SUFFIX = ".part"


def blob_key(digest: Digest) -> PurePosixPath:
    """Relative key of a committed blob. The digest was validated, so no traversal is possible."""
    return PurePosixPath(BLOBS_DIR, digest.algorithm, digest.hex[:2], digest.hex)


def s3_prefix(prefix: str) -> str:
    """A configured S3 prefix normalised to ``""`` or ``"some/path/"``."""
    prefix = prefix.strip("/")
    return f"{prefix}/" if prefix else ""


def s3_blob_key(prefix: str, digest: Digest) -> str:
    """S3 key of a committed blob (``prefix`` as returned by :func:`s3_prefix`)."""
    return f"{prefix}{blob_key(digest)}"


def digest_of_key(relative: str) -> Digest | None:
    """The digest a relative blob key (``blobs/<alg>/<xx>/<hex>``) names, or None."""
    parts = relative.split("/")
    if len(parts) != 4 or parts[0] != BLOBS_DIR:
        return None
    _, algorithm, sub, hexpart = parts
    try:
        digest = Digest.parse(f"{algorithm}:{hexpart}")
    except OCIError:
        return None
    return digest if sub == hexpart[:2] else None


def temp_prefix(digest: Digest) -> str:
    """File-name prefix of in-progress writes for a digest."""
    return f"{digest.algorithm}-{digest.hex}."


def claim_file(key: str) -> str:
    """File name (in tmp/) of the claim on ``key``: blobs keep their digest in the name (so
    orphaned partial files find their claim); other keys are hashed (they may hold any
    character)."""
    kind, _, rest = key.partition(":")
    if kind == "blob":
        try:
            return temp_prefix(Digest.parse(rest)) + "lock"
        except OCIError:
            pass
    return "claim-" + hashlib.sha256(key.encode()).hexdigest()[:40] + ".lock"
