"""Checking credentials: HTTP Basic against htpasswd (bcrypt) or static tokens, Bearer tokens."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Mapping
from dataclasses import dataclass

import bcrypt

from mirrorcache.auth.identity import Identity

#: How long a successful bcrypt check is remembered (a pull sends dozens of requests).
VERIFIED_TTL = 300.0
_MAX_VERIFIED = 10000


class BadCredentials(Exception):
    """Credentials were sent and are wrong (or unusable); ``user`` is the name claimed."""

    def __init__(self, user: str | None, reason: str) -> None:
        self.user = user
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True)
class Credentials:
    """What an ``Authorization`` header carried."""

    scheme: str  # "basic" or "bearer"
    user: str | None
    secret: str


def parse_authorization(value: str | None) -> Credentials | None:
    """None for no credentials (no header, or the empty ``Basic Og==`` that containers/image
    sends when it has none); raise BadCredentials for a malformed header."""
    if not value or not value.strip():
        return None
    scheme, _, rest = value.strip().partition(" ")
    rest = rest.strip()
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(rest, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise BadCredentials(None, "malformed Basic credentials") from None
        user, sep, password = decoded.partition(":")
        if not sep:
            raise BadCredentials(None, "malformed Basic credentials")
        if not user and not password:
            return None
        return Credentials("basic", user, password)
    if scheme.lower() == "bearer" and rest:
        return Credentials("bearer", None, rest)
    raise BadCredentials(None, f"unsupported authorization scheme {scheme[:20]!r}")


class Authenticator:
    """Verifies credentials against the configured users and tokens; owned by the app."""

    def __init__(self, users: Mapping[str, str], tokens: Mapping[str, str],
                 groups: Mapping[str, frozenset[str]]) -> None:
        self._users = {u: h.encode() for u, h in users.items()}
        self._tokens = {name: tok.encode() for name, tok in tokens.items()}
        self._groups_of: dict[str, frozenset[str]] = {}
        for group, members in groups.items():
            for member in members:
                self._groups_of[member] = self._groups_of.get(member, frozenset()) | {group}
        self._verified: dict[bytes, float] = {}
        self._dummy_hash: bytes | None = None

    def identity(self, name: str) -> Identity:
        return Identity(name, self._groups_of.get(name, frozenset()))

    async def verify(self, creds: Credentials) -> Identity:
        """The identity these credentials prove, or raise BadCredentials."""
        if creds.scheme == "bearer":
            name = self._match_token(None, creds.secret)
            if name is None:
                raise BadCredentials(None, "unknown token")
            return self.identity(name)
        user = creds.user or ""
        hashed = self._users.get(user)
        if hashed is not None:
            if await self._check_bcrypt(user, creds.secret, hashed):
                return self.identity(user)
            raise BadCredentials(user, "wrong password")
        if user in self._tokens:
            if self._match_token(user, creds.secret) == user:
                return self.identity(user)
            raise BadCredentials(user, "wrong token")
        # Unknown user: spend the same bcrypt time, so timing does not reveal who exists.
        await self._check_bcrypt(user, creds.secret, self._dummy())
        raise BadCredentials(user, "unknown user")

    def _match_token(self, name: str | None, secret: str) -> str | None:
        """Compare against every token (constant time each) and return the matching name."""
        given = secret.encode()
        found: str | None = None
        for token_name, token in self._tokens.items():
            if hmac.compare_digest(given, token) and (name is None or name == token_name):
                found = token_name
        return found

    def _dummy(self) -> bytes:
        if self._dummy_hash is None:
            cost = 10
            if self._users:
                cost = int(next(iter(self._users.values()))[4:6])
            self._dummy_hash = bcrypt.hashpw(b"mirrorcache-no-such-user", bcrypt.gensalt(cost))
        return self._dummy_hash

    async def _check_bcrypt(self, user: str, password: str, hashed: bytes) -> bool:
        key = hashlib.sha256(b"\0".join((user.encode(), password.encode(), hashed))).digest()
        now = time.monotonic()
        expires = self._verified.get(key)
        if expires is not None and expires > now:
            return True
        ok = await asyncio.to_thread(_checkpw, password.encode(), hashed)
        if ok:
            if len(self._verified) >= _MAX_VERIFIED:
                self._verified.clear()
            self._verified[key] = now + VERIFIED_TTL
        return ok


def _checkpw(password: bytes, hashed: bytes) -> bool:
    try:
        return bcrypt.checkpw(password, hashed)
    except ValueError:  # bcrypt >= 5 refuses passwords over 72 bytes
        return False
