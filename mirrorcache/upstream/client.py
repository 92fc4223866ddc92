"""Talking to one upstream registry: auth, redirects, retries, timeouts, redaction."""

from __future__ import annotations

import asyncio
import base64
import re
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from urllib.parse import urljoin, urlsplit

import aiohttp
import structlog
from multidict import CIMultiDict
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)
from yarl import URL

from mirrorcache.config import UpstreamConfig
from mirrorcache.errors import ErrorCode, OCIError
from mirrorcache.metrics import Metrics
from mirrorcache.upstream.auth import (
    Challenge,
    TokenCache,
    TokenError,
    fetch_token,
    parse_challenges,
    pull_scope,
)
from mirrorcache.upstream.breaker import CircuitBreaker, Rejection
from mirrorcache.upstream.dockerhub import parse_ratelimit

log = structlog.get_logger("mirrorcache.upstream")

MAX_REDIRECTS = 5
_REDIRECTS = (301, 302, 303, 307, 308)


def ssl_context_for(cfg: UpstreamConfig) -> ssl.SSLContext | bool:
    """Verified TLS by default; a private CA with ``ca_file``; no checks only if ``insecure``."""
    if cfg.insecure:
        return False
    if cfg.ca_file:
        return ssl.create_default_context(cafile=cfg.ca_file)
    return True


class UpstreamUnavailable(OCIError):
    """The upstream could not be reached or timed out."""

    def __init__(self, upstream: str, reason: str) -> None:
        super().__init__(ErrorCode.UNAVAILABLE,
                         f"upstream {upstream} unavailable: {reason}", status=503)


class UpstreamRejected(OCIError):
    """The upstream's circuit is open: we fail fast instead of calling it."""

    def __init__(self, upstream: str, rejection: Rejection) -> None:
        wait = max(int(rejection.retry_after + 0.999), 1)
        if rejection.rate_limited:
            super().__init__(ErrorCode.TOOMANYREQUESTS,
                             f"upstream {upstream} is rate-limiting this "
                             f"mirror; retry in {wait}s", status=429,
                             headers={"Retry-After": str(wait)})
        else:
            super().__init__(ErrorCode.UNAVAILABLE,
                             f"upstream {upstream} is failing; not calling it for "
                             f"{wait}s", status=503, headers={"Retry-After": str(wait)})


class _Retryable(Exception):
    """An attempt that may be retried (connection error or 502/503/504)."""


RETRY_STATUSES = (502, 503, 504)


def retry_after_seconds(value: str | None, default: float) -> float:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date)."""
    if not value:
        return default
    value = value.strip()
    if re.fullmatch(r"[0-9]{1,10}", value):
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return default
    return max((when - datetime.now(UTC)).total_seconds(), 0.0)


class UpstreamClient:
    """Requests to one upstream registry, authenticated as that upstream asks."""

    def __init__(self, cfg: UpstreamConfig, session: aiohttp.ClientSession,
                 metrics: Metrics) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self._session = session
        self._metrics = metrics
        self._ssl = ssl_context_for(cfg)
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=cfg.connect_timeout, sock_connect=cfg.connect_timeout,
            sock_read=cfg.read_timeout,
        )
        self._basic = basic_auth_header(cfg.username, cfg.password) if cfg.username else None
        self._tokens = TokenCache()
        self._bearer: Challenge | None = None  # last bearer challenge, for proactive tokens
        self._use_basic = False
        self._token_locks: dict[str, asyncio.Lock] = {}
        self.ratelimit: dict[str, str] = {}
        self.breaker = CircuitBreaker(cfg.name, cfg.breaker_failures, cfg.breaker_cooldown)

    def url(self, path: str) -> str:
        return self.cfg.url + path

    async def _token_for(self, challenge: Challenge, scope: str, *, fresh: bool) -> str:
        realm, service = challenge.realm or "", challenge.params.get("service", "")
        lock = self._token_locks.setdefault(scope, asyncio.Lock())
        async with lock:
            if not fresh:
                cached = self._tokens.get(realm, service, scope)
                if cached:
                    return cached
            try:
                token, lifetime = await fetch_token(self._session, challenge, scope, self._basic,
                                                    self._ssl, self._timeout)
            except TokenError as exc:
                if exc.status in (401, 403):
                    raise OCIError(ErrorCode.UNAUTHORIZED if exc.status == 401
                                   else ErrorCode.DENIED,
                                   f"upstream {self.name} refused credentials for {scope}",
                                   status=exc.status) from None
                raise UpstreamUnavailable(self.name, str(exc)) from None
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise UpstreamUnavailable(self.name, f"token endpoint: {type(exc).__name__}"
                                          ) from None
            self._tokens.put(realm, service, scope, token, lifetime)
            return token

    async def _auth_header(self, scope: str) -> str | None:
        if self._bearer is not None:
            realm, service = self._bearer.realm or "", self._bearer.params.get("service", "")
            cached = self._tokens.get(realm, service, scope)
            if cached:
                return f"Bearer {cached}"
            return f"Bearer {await self._token_for(self._bearer, scope, fresh=False)}"
        if self._use_basic and self._basic is not None:
            return self._basic
        return None

    async def _send(self, method: str, url: str, headers: CIMultiDict[str]
                    ) -> aiohttp.ClientResponse:
        """One logical request: retried with backoff on connection errors and 502/503/504,
        never on 429 (that opens the breaker for Retry-After instead)."""
        cfg = self.cfg
        retrying = AsyncRetrying(
            stop=stop_after_attempt(cfg.max_retries + 1) | stop_after_delay(cfg.retry_max_wait),
            wait=wait_exponential_jitter(multiplier=0.1, max=max(cfg.retry_max_wait / 4, 0.1)),
            retry=retry_if_exception_type(_Retryable),
            reraise=True,
        )
        last: aiohttp.ClientResponse | None = None
        try:
            async for attempt in retrying:
                with attempt:
                    if last is not None:
                        last.release()
                        last = None
                    last = await self._send_once(method, url, headers)
                    if last.status in RETRY_STATUSES:
                        raise _Retryable()
        except _Retryable as exc:
            if last is None:  # the last attempt could not connect
                cause = exc.__cause__
                raise (cause if isinstance(cause, OCIError)
                       else UpstreamUnavailable(self.name, "retries exhausted")) from None
            # attempts used up: hand the last 5xx to the caller to relay
        assert last is not None
        return last

    async def _send_once(self, method: str, url: str, headers: CIMultiDict[str]
                         ) -> aiohttp.ClientResponse:
        rejection = self.breaker.before_call()
        if rejection is not None:
            raise UpstreamRejected(self.name, rejection)
        start = time.monotonic()
        path = urlsplit(url).path
        try:
            resp = await self._session.request(
                method, url, headers=headers, allow_redirects=False, ssl=self._ssl,
                timeout=self._timeout, auto_decompress=False,
            )
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self.breaker.failure()
            self._metrics.upstream_requests.labels(self.name, method, "error").inc()
            self._metrics.breaker_open.labels(self.name).set(int(self.breaker.is_open))
            log.warning("upstream.request_failed", upstream=self.name, method=method,
                        path=path, error=type(exc).__name__)
            raise _Retryable() from UpstreamUnavailable(self.name, type(exc).__name__)
        if resp.status == 429:
            self.breaker.failure(retry_after=retry_after_seconds(resp.headers.get("Retry-After"),
                                                                 self.cfg.breaker_cooldown))
        elif resp.status >= 500:
            self.breaker.failure()
        else:
            self.breaker.success()
        self._metrics.breaker_open.labels(self.name).set(int(self.breaker.is_open))
        self._metrics.upstream_requests.labels(self.name, method, str(resp.status)).inc()
        self._note_ratelimit(resp)
        log.info("upstream.request", upstream=self.name, method=method,
                 host=urlsplit(url).netloc, path=path, status=resp.status,
                 duration_ms=round((time.monotonic() - start) * 1000, 1),
                 ratelimit_remaining=self.ratelimit.get("remaining"))
        return resp

    def _note_ratelimit(self, resp: aiohttp.ClientResponse) -> None:
        rate = parse_ratelimit(resp.headers)
        if rate is not None:
            self.ratelimit = {"limit": rate.limit, "remaining": rate.remaining}
            if rate.remaining_count is not None:
                self._metrics.ratelimit_remaining.labels(self.name).set(rate.remaining_count)

    @asynccontextmanager
    async def open(
        self,
        method: str,
        path: str,
        repository: str,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """Send a request for ``repository`` and yield the final response (after auth and
        redirects). The body is the caller's to read; it is released on exit."""
        scope = pull_scope(repository)
        url = self.url(path)
        if params:
            url = str(URL(url).with_query(dict(params)))
        hdrs: CIMultiDict[str] = CIMultiDict(headers or {})
        auth = await self._auth_header(scope)
        if auth:
            hdrs["Authorization"] = auth
        resp = await self._send(method, url, hdrs)
        try:
            if resp.status == 401:
                resp = await self._retry_authenticated(method, url, hdrs, scope, resp)
            resp = await self._follow_redirects(method, url, hdrs, resp)
            yield resp
        finally:
            resp.release()

    async def _retry_authenticated(self, method: str, url: str, hdrs: CIMultiDict[str],
                                   scope: str, resp: aiohttp.ClientResponse
                                   ) -> aiohttp.ClientResponse:
        challenges = parse_challenges(", ".join(resp.headers.getall("WWW-Authenticate", [])))
        bearer = next((c for c in challenges if c.scheme == "bearer"), None)
        basic = next((c for c in challenges if c.scheme == "basic"), None)
        if bearer is not None:
            had_token = "Authorization" in hdrs
            self._bearer = bearer
            # The challenge may ask for a wider scope than ours (e.g. catalog); use it.
            want = bearer.params.get("scope", scope)
            token = await self._token_for(bearer, want, fresh=had_token)
            hdrs["Authorization"] = f"Bearer {token}"
        elif basic is not None and self._basic is not None and not self._use_basic:
            self._use_basic = True
            hdrs["Authorization"] = self._basic
        else:
            return resp
        resp.release()
        return await self._send(method, url, hdrs)

    async def _follow_redirects(self, method: str, url: str, hdrs: CIMultiDict[str],
                                resp: aiohttp.ClientResponse) -> aiohttp.ClientResponse:
        hops = 0
        origin = _origin(url)
        while resp.status in _REDIRECTS and "Location" in resp.headers and method in ("GET",
                                                                                      "HEAD"):
            hops += 1
            if hops > MAX_REDIRECTS:
                raise OCIError(ErrorCode.UNKNOWN,
                               f"upstream {self.name}: too many redirects", status=502)
            url = urljoin(url, resp.headers["Location"])
            if urlsplit(url).scheme not in ("http", "https"):
                raise OCIError(ErrorCode.UNKNOWN, f"upstream {self.name}: bad redirect", status=502)
            resp.release()
            if _origin(url) != origin:
                # Another origin (object storage, or a downgrade to http) gets no credentials.
                hdrs = CIMultiDict((k, v) for k, v in hdrs.items() if k.lower() != "authorization")
                origin = _origin(url)
            resp = await self._send(method, url, hdrs)
        return resp


def basic_auth_header(username: str, password: str | None) -> str:
    """An ``Authorization: Basic`` value (RFC 7617, UTF-8)."""
    raw = f"{username}:{password or ''}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()
