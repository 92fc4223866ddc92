"""Incremental hashing for the digests we verify."""

from __future__ import annotations

import hashlib

from mirrorcache.oci.reference import Digest


def hasher(digest: Digest) -> hashlib._Hash:
    """A fresh hash object for the algorithm of ``digest``."""
    return hashlib.new(digest.algorithm)


def digest_of(data: bytes, algorithm: str = "sha256") -> Digest:
    """The digest of a byte string."""
    return Digest(algorithm, hashlib.new(algorithm, data).hexdigest())
