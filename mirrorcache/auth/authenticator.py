"""Checking credentials: HTTP Basic against htpasswd (bcrypt) or static tokens, Bearer tokens."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import bcrypt

from mirrorcache.auth.identity import Identity

#: How long a successful bcrypt check is remembered (a pull sends dozens of requests).
VERIFIED_TTL = 300.0
_MAX_VERIFIED = 10000
#: Threads that run bcrypt: a login flood queues here, never in asyncio's default pool.
BCRYPT_THREADS = 2
#: bcrypt checks queued at once (all addresses together) before logins are refused.
MAX_PENDING_CHECKS = 256
#: Salt and digest of a real bcrypt hash; with any cost prefix, it matches no password
#: but costs exactly that much to check.
_DUMMY_TAIL = "Bkf.XSBW2OlLij0AkXbNa.CMLpAseKhMbFZJNCc/jHV42ryiTmtKG"


class Overloaded(Exception):
    """Too many credential checks are queued: refuse the login for now (429)."""


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
    """Verifies credentials against the configured users and tokens; owned by the app.

    Every check that is not answered from the cache of recent successes costs exactly one
    bcrypt computation, whatever the name: a known user (their hash), an unknown user or a
    static token (a dummy hash of the same cost), so timing does not tell which names exist.
    bcrypt runs in this object's own small thread pool (closed by :meth:`aclose`), so a
    flood of logins cannot starve asyncio's default executor, which storage uses.
    """

    def __init__(self, users: Mapping[str, str], tokens: Mapping[str, str],
                 groups: Mapping[str, frozenset[str]], *, threads: int = BCRYPT_THREADS,
                 max_pending: int = MAX_PENDING_CHECKS) -> None:
        self._users = {u: h.encode() for u, h in users.items()}
        self._tokens = {name: tok.encode() for name, tok in tokens.items()}
        self._groups_of: dict[str, frozenset[str]] = {}
        for group, members in groups.items():
            for member in members:
                self._groups_of[member] = self._groups_of.get(member, frozenset()) | {group}
        self._verified: dict[bytes, float] = {}
        self._dummy_hash = _dummy_hash(self._users.values())
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="mirrorcache-bcrypt")
        self._max_pending = max_pending
        self._pending = 0

    def identity(self, name: str) -> Identity:
        return Identity(name, self._groups_of.get(name, frozenset()))

    async def aclose(self) -> None:
        """Stop the bcrypt threads (queued checks are dropped)."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def verify(self, creds: Credentials) -> Identity:
        """The identity these credentials prove, or raise BadCredentials (or Overloaded)."""
        if creds.scheme == "bearer":
            name = await self._check_token(None, creds.secret)
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
            if await self._check_token(user, creds.secret) == user:
                return self.identity(user)
            raise BadCredentials(user, "wrong token")
        # Unknown user: spend the same bcrypt time, so timing does not reveal who exists.
        await self._check_bcrypt(user, creds.secret, self._dummy_hash)
        raise BadCredentials(user, "unknown user")

    async def _check_token(self, name: str | None, secret: str) -> str | None:
        """The matching token name (compared in constant time), after one bcrypt-equivalent
        of work unless this secret was verified recently."""
        found = self._match_token(name, secret)
        key = self._cache_key("\0token", secret, b"")
        if found is not None and self._cached(key):
            return found
        await self._bcrypt(secret.encode(), self._dummy_hash)
        if found is not None:
            self._remember(key)
        return found

    def _match_token(self, name: str | None, secret: str) -> str | None:
        """Compare against every token (constant time each) and return the matching name."""
        given = secret.encode()
        found: str | None = None
        for token_name, token in self._tokens.items():
            if hmac.compare_digest(given, token) and (name is None or name == token_name):
                found = token_name
        return found

    @staticmethod
    def _cache_key(user: str, password: str, hashed: bytes) -> bytes:
        return hashlib.sha256(b"\0".join((user.encode(), password.encode(), hashed))).digest()

    def _cached(self, key: bytes) -> bool:
        expires = self._verified.get(key)
        return expires is not None and expires > time.monotonic()

    def _remember(self, key: bytes) -> None:
        if len(self._verified) >= _MAX_VERIFIED:
            self._verified.clear()
        self._verified[key] = time.monotonic() + VERIFIED_TTL

    async def _check_bcrypt(self, user: str, password: str, hashed: bytes) -> bool:
        key = self._cache_key(user, password, hashed)
        if self._cached(key):
            return True
        ok = await self._bcrypt(password.encode(), hashed)
        if ok:
            self._remember(key)
        return ok

    async def _bcrypt(self, password: bytes, hashed: bytes) -> bool:
        if self._pending >= self._max_pending:
            raise Overloaded(f"{self._pending} credential checks queued")
        self._pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._executor, _checkpw, password, hashed)
        finally:
            self._pending -= 1


def _dummy_hash(hashes: Iterable[bytes]) -> bytes:
    """A well-formed bcrypt hash that matches no password, at the users' usual cost."""
    costs = Counter(int(h[4:6]) for h in hashes)
    cost = costs.most_common(1)[0][0] if costs else 10
    return f"$2b${cost:02d}${_DUMMY_TAIL}".encode()


def _checkpw(password: bytes, hashed: bytes) -> bool:
    try:
        return bcrypt.checkpw(password, hashed)
    except ValueError:  # bcrypt >= 5 refuses passwords over 72 bytes
        return False
