"""Pins: image references and globs that are never evicted.

A pin is ``upstream/repository[:tagglob]`` in policy.py's glob style (``*`` within a
segment, ``**`` across segments), or ``upstream/repository@sha256:...`` for one manifest.
A pin without a tag part pins every tag of the matching repositories.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from mirrorcache.oci.reference import Digest
from mirrorcache.policy import compile_pattern


@dataclass(frozen=True)
class Pin:
    text: str
    name_re: re.Pattern[str]
    tag_re: re.Pattern[str] | None
    digest: Digest | None

    def matches(self, upstream: str, repository: str, tag: str | None,
                digest: Digest | None) -> bool:
        if not self.name_re.fullmatch(f"/{upstream}/{repository}"):
            return False
        if self.digest is not None:
            return digest == self.digest
        if self.tag_re is None:
            return True
        return tag is not None and self.tag_re.fullmatch(tag) is not None


def parse_pin(text: str) -> Pin:
    """Raises ValueError with a message for a malformed pin."""
    name, at, digest = text.partition("@")
    parsed: Digest | None = None
    if at:
        try:
            parsed = Digest.parse(digest)
        except Exception:
            raise ValueError(f"{text!r}: {digest!r} is not a digest") from None
    name_re, tag_re = compile_pattern(name)
    if parsed is not None and tag_re is not None:
        raise ValueError(f"{text!r}: pin a tag or a digest, not both")
    return Pin(text, name_re, tag_re, parsed)


class Pins:
    """The pins in force: the config's and those stored by ``mirrorcache pin``."""

    def __init__(self, texts: Iterable[str]) -> None:
        self.pins = tuple(parse_pin(t) for t in dict.fromkeys(texts))

    def __bool__(self) -> bool:
        return bool(self.pins)

    def matches(self, upstream: str, repository: str, tag: str | None,
                digest: Digest | None) -> str | None:
        """The first pin that keeps this reference, or None."""
        for pin in self.pins:
            if pin.matches(upstream, repository, tag, digest):
                return pin.text
        return None
