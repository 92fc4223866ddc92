"""Rendezvous (highest-random-weight) hashing: which member owns a key.

Every member scores every key with a hash of (member, key); the highest score owns it. When a
member joins or leaves, only the keys it wins (or won) move: every other key keeps its owner.
Pure functions, no state.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def weight(member: str, key: str) -> int:
    """The member's score for ``key`` (64 bits of blake2b over member and key)."""
    h = hashlib.blake2b(f"{member}\0{key}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "big")


def owner(key: str, members: Iterable[str]) -> str | None:
    """The member that owns ``key`` (None if there are no members). Ties (practically
    impossible) go to the larger name, so every replica picks the same one."""
    best: tuple[int, str] | None = None
    for m in members:
        score = (weight(m, key), m)
        if best is None or score > best:
            best = score
    return None if best is None else best[1]

