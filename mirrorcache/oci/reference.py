"""Repository names, tags and digests, validated against the OCI distribution grammar."""

from __future__ import annotations

import re
from dataclasses import dataclass

from mirrorcache.errors import ErrorCode, OCIError

MAX_NAME_LENGTH = 255

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
# Algorithms we accept, with the exact hex length of their encoded part.
DIGEST_ALGORITHMS: dict[str, int] = {"sha256": 64, "sha512": 128}
_DIGEST_RE = re.compile(r"([a-z0-9]+(?:[+._-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)")


@dataclass(frozen=True, slots=True)
class Digest:
    """A content digest such as ``sha256:<64 hex>``."""

    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    @classmethod
    def parse(cls, value: str) -> Digest:
        """Parse and validate a digest string; raise DIGEST_INVALID otherwise."""
        m = _DIGEST_RE.fullmatch(value)
        if m is None:
            raise OCIError(ErrorCode.DIGEST_INVALID, f"invalid digest: {value[:80]!r}")
        algorithm, encoded = m.group(1), m.group(2)
        length = DIGEST_ALGORITHMS.get(algorithm)
        if length is None:
            raise OCIError(ErrorCode.DIGEST_INVALID,
                           f"unsupported digest algorithm: {algorithm[:20]!r}")
        if len(encoded) != length or not all(c in "0123456789abcdef" for c in encoded):
            raise OCIError(ErrorCode.DIGEST_INVALID, f"invalid {algorithm} digest: {value[:80]!r}")
        return cls(algorithm, encoded)


def is_digest(reference: str) -> bool:
    """True when a manifest reference is a digest rather than a tag."""
    return ":" in reference


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid repository name, else raise NAME_INVALID."""
    if len(name) > MAX_NAME_LENGTH:
        raise OCIError(ErrorCode.NAME_INVALID,
                       f"repository name longer than {MAX_NAME_LENGTH} characters")
    if not NAME_RE.fullmatch(name):
        raise OCIError(ErrorCode.NAME_INVALID, f"invalid repository name: {name[:100]!r}")
    return name


def validate_tag(tag: str) -> str:
    """Return ``tag`` if it matches the tag grammar, else raise TAG_INVALID."""
    if not TAG_RE.fullmatch(tag):
        raise OCIError(ErrorCode.TAG_INVALID, f"invalid tag: {tag[:140]!r}")
    return tag


@dataclass(frozen=True, slots=True)
class Reference:
    """A manifest reference: exactly one of a tag or a digest."""

    tag: str | None = None
    digest: Digest | None = None

    @classmethod
    def parse(cls, value: str) -> Reference:
        if is_digest(value):
            return cls(digest=Digest.parse(value))
        return cls(tag=validate_tag(value))

    def __str__(self) -> str:
        return self.tag if self.tag is not None else str(self.digest)
