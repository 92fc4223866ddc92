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

Object storage (S3) uses the same relative keys under a prefix: ``blobs/<alg>/<xx>/<hex>``.
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
