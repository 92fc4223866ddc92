"""The authenticated caller."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Identity:
    """A caller who proved who they are; ``groups`` come from ``auth.groups`` in the config."""

    name: str
    groups: frozenset[str] = frozenset()
