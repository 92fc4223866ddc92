"""Upstream authentication: WWW-Authenticate challenges, the bearer token flow, a token cache."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import aiohttp
import structlog

log = structlog.get_logger("mirrorcache.upstream.auth")

_PARAM_RE = re.compile(r'\s*([A-Za-z0-9_-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?')
#: Tokens are dropped this long before they expire, so none expires in flight.
EXPIRY_MARGIN = 10.0
DEFAULT_TOKEN_LIFETIME = 60.0


@dataclass(frozen=True, slots=True)
class Challenge:
    """One parsed challenge from a ``WWW-Authenticate`` header."""

    scheme: str
    params: dict[str, str] = field(default_factory=dict)

    @property
    def realm(self) -> str | None:
        return self.params.get("realm")


def parse_challenges(header: str) -> list[Challenge]:
    """Parse ``Bearer realm="...",service="...",scope="..."`` (and Basic) challenges."""
    challenges: list[Challenge] = []
    rest = header.strip()
    while rest:
        m = re.match(r"([A-Za-z][A-Za-z0-9_-]*)(?:\s+|$)", rest)
        if m is None:
            break
        scheme = m.group(1).lower()
        rest = rest[m.end():]
        params: dict[str, str] = {}
        while rest:
            pm = _PARAM_RE.match(rest)
            if pm is None or (pm.group(2) is None and pm.group(3) is None):
                break
            # A bare token followed by a space starts the next challenge, not a param.
            params[pm.group(1).lower()] = (
                re.sub(r"\\(.)", r"\1", pm.group(2)) if pm.group(2) is not None else pm.group(3)
            )
            rest = rest[pm.end():]
        challenges.append(Challenge(scheme, params))
        rest = rest.lstrip(", ")
    return challenges


def pull_scope(repository: str) -> str:
    return f"repository:{repository}:pull"


@dataclass(slots=True)
class _Token:
    value: str
    expires_at: float


class TokenCache:
    """Bearer tokens per (realm, service, scope), kept until shortly before they expire."""

    def __init__(self) -> None:
        self._tokens: dict[tuple[str, str, str], _Token] = {}

    def get(self, realm: str, service: str, scope: str) -> str | None:
        tok = self._tokens.get((realm, service, scope))
        if tok is None:
            return None
        if tok.expires_at <= time.monotonic():
            del self._tokens[(realm, service, scope)]
            return None
        return tok.value

    def put(self, realm: str, service: str, scope: str, value: str, lifetime: float) -> None:
        if len(self._tokens) > 10000:
            self._tokens.clear()
        expires = time.monotonic() + max(lifetime - EXPIRY_MARGIN, 1.0)
        self._tokens[(realm, service, scope)] = _Token(value, expires)


class TokenError(Exception):
    """The token endpoint refused or failed."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


async def fetch_token(
    session: aiohttp.ClientSession,
    challenge: Challenge,
    scope: str,
    basic: str | None,
    ssl: object,
    timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109  aiohttp's per-request timeouts
) -> tuple[str, float]:
    """Ask the challenge's realm for a token; return (token, lifetime in seconds)."""
    realm = challenge.realm
    if not realm or not realm.startswith(("https://", "http://")):
        raise TokenError(502, "upstream sent a bearer challenge without a usable realm")
    params = {"scope": scope}
    if "service" in challenge.params:
        params["service"] = challenge.params["service"]
    headers = {"Authorization": basic} if basic else {}
    async with session.get(realm, params=params, headers=headers, ssl=ssl,  # type: ignore[arg-type]
                           timeout=timeout, allow_redirects=True) as resp:
        if resp.status != 200:
            log.warning("upstream.token_refused", realm=realm, status=resp.status, scope=scope)
            raise TokenError(resp.status, f"token endpoint answered {resp.status}")
        try:
            doc = await resp.json(content_type=None)
        except ValueError:
            raise TokenError(502, "token endpoint sent invalid JSON") from None
    token = doc.get("token") or doc.get("access_token") if isinstance(doc, dict) else None
    if not isinstance(token, str) or not token:
        raise TokenError(502, "token endpoint sent no token")
    lifetime = doc.get("expires_in", DEFAULT_TOKEN_LIFETIME)
    if not isinstance(lifetime, int | float) or lifetime <= 0:
        lifetime = DEFAULT_TOKEN_LIFETIME
    log.debug("upstream.token_fetched", realm=realm, scope=scope, expires_in=lifetime)
    return token, float(lifetime)
