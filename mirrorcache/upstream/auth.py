"""Upstream authentication: WWW-Authenticate challenges, the bearer token flow, a token cache."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field

import aiohttp
import structlog
from yarl import URL

from mirrorcache.upstream.body import (
    MAX_TOKEN_LENGTH,
    MAX_TOKEN_RESPONSE,
    BodyRefused,
    read_capped,
)
from mirrorcache.upstream.realm import RealmPolicy

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
    """The token endpoint refused or failed; ``refused_realm`` when we would not ask it."""

    def __init__(self, status: int, message: str, *, refused_realm: bool = False) -> None:
        self.status = status
        self.refused_realm = refused_realm
        super().__init__(message)


#: Redirects followed from a token realm (each hop is checked like the realm itself).
MAX_TOKEN_REDIRECTS = 3
_TOKEN_RE = re.compile(r"[\x21-\x7e]+")


async def fetch_token(
    session: aiohttp.ClientSession,
    challenge: Challenge,
    scope: str,
    basic: str | None,
    ssl: object,
    timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109  aiohttp's per-request timeouts
    policy: RealmPolicy,
) -> tuple[str, float]:
    """Ask the challenge's realm for a token; return (token, lifetime in seconds).

    The realm must pass ``policy`` (with credentials only where they may go); the answer is
    read raw (no decompression) and capped at ``MAX_TOKEN_RESPONSE``; a token longer than
    ``MAX_TOKEN_LENGTH`` or not fit for a header is refused.
    """
    realm = challenge.realm
    if not realm or not realm.startswith(("https://", "http://")):
        raise TokenError(502, "upstream sent a bearer challenge without a usable realm")
    params = {"scope": scope}
    if "service" in challenge.params:
        params["service"] = challenge.params["service"]
    url = str(URL(realm).update_query(params))
    headers = {"Accept-Encoding": "identity", "Accept": "application/json"}
    if basic:
        headers["Authorization"] = basic
    for _ in range(MAX_TOKEN_REDIRECTS + 1):
        refusal = policy.refusal(url, credentials=basic is not None)
        if refusal is not None:
            raise TokenError(502, f"token realm {_redact(url)} refused: {refusal}",
                             refused_realm=True)
        async with session.get(url, headers=headers, ssl=ssl,  # type: ignore[arg-type]
                               timeout=timeout, allow_redirects=False,
                               auto_decompress=False) as resp:
            if resp.status in (301, 302, 303, 307, 308) and "Location" in resp.headers:
                url = str(URL(url).join(URL(resp.headers["Location"])))
                continue
            if resp.status != 200:
                log.warning("upstream.token_refused", realm=_redact(url), status=resp.status,
                            scope=scope)
                raise TokenError(resp.status, f"token endpoint answered {resp.status}")
            try:
                raw = await read_capped(resp, MAX_TOKEN_RESPONSE, "token response")
            except BodyRefused as exc:
                raise TokenError(502, f"token endpoint: {exc}") from None
        break
    else:
        raise TokenError(502, "token endpoint redirected too often")
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        raise TokenError(502, "token endpoint sent invalid JSON") from None
    token = doc.get("token") or doc.get("access_token") if isinstance(doc, dict) else None
    if not isinstance(token, str) or not token:
        raise TokenError(502, "token endpoint sent no token")
    if len(token) > MAX_TOKEN_LENGTH:
        raise TokenError(502, f"token endpoint sent a token longer than "
                         f"{MAX_TOKEN_LENGTH // 1024} KiB")
    if not _TOKEN_RE.fullmatch(token):
        raise TokenError(502, "token endpoint sent a token with characters not allowed in a "
                         "header")
    lifetime = doc.get("expires_in", DEFAULT_TOKEN_LIFETIME)
    if isinstance(lifetime, bool) or not isinstance(lifetime, int | float) or not (
            0 < lifetime < 1e9):
        lifetime = DEFAULT_TOKEN_LIFETIME
    log.debug("upstream.token_fetched", realm=_redact(url), scope=scope, expires_in=lifetime)
    return token, float(lifetime)


def _redact(url: str) -> str:
    """The realm without its query (which may carry account names) or userinfo."""
    u = URL(url)
    return str(u.with_query(None).with_user(None).with_fragment(None))
