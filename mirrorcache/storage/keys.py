"""The content-addressed layout, in one place.

Filesystem backend, under the configured root::

    <root>/blobs/<algorithm>/<first two hex>/<hex>    committed content (layers, configs,
                                                      manifests), immutable, written once
    <root>/tmp/<algorithm>-<hex>.<random>.part        an in-progress write; renamed into
                                                      blobs/ only after its digest verified;
                                                      anything here at start-up is a crash
                                                      leftover and is deleted
    <root>/metadata/                                  diskcache (sqlite): tag -> digest records,
                                                      manifest media types, repository links,
                                                      last access times

Object storage (S3) uses the same relative keys under a prefix: ``blobs/<alg>/<xx>/<hex>``.
"""

from __future__ import annotations

from pathlib import PurePosixPath

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
