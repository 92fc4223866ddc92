"""Digests of byte strings."""

from __future__ import annotations

import hashlib

from mirrorcache.oci.reference import Digest


def digest_of(data: bytes, algorithm: str = "sha256") -> Digest:
    """The digest of a byte string."""
    return Digest(algorithm, hashlib.new(algorithm, data).hexdigest())
