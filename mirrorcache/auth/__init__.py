"""Client authentication: who is pulling (htpasswd users, static tokens, groups)."""

from mirrorcache.auth.identity import Identity

__all__ = ["Identity"]
