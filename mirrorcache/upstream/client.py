"""Talking to one upstream registry: auth, redirects, retries, timeouts, redaction."""

from __future__ import annotations

import asyncio
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
from mirrorcache.upstream.credentials import (  # noqa: F401  basic_auth_header: re-export
    CredentialSource,
    StaticCredentials,
    basic_auth_header,
)
from mirrorcache.upstream.dockerhub import parse_ratelimit
from mirrorcache.upstream.ecr import EcrCredentials
from mirrorcache.upstream.realm import RealmPolicy, redirect_refusal

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
            why = f" ({rejection.reason})" if rejection.reason else ""
            super().__init__(ErrorCode.UNAVAILABLE,
                             f"upstream {upstream} is failing{why}; not calling "
                             f"it for {wait}s", status=503, headers={"Retry-After": str(wait)})


class UpstreamBusy(OCIError):
    """Every connection slot to the upstream stayed in use for ``pool_timeout``: the mirror is
    busy, the upstream is not at fault (the breaker is not told)."""

    def __init__(self, upstream: str, slots: int, waited: float) -> None:
        super().__init__(ErrorCode.UNAVAILABLE, f"mirror busy: all {slots} connections to upstream "
                         f"{upstream} stayed in use for {waited:g}s", status=503,
                         headers={"Retry-After": "1"})


def describe_failure(exc: BaseException, host: str) -> tuple[str, bool]:
    """In words, what went wrong talking to ``host``; and whether no request content could
    have caused it (DNS, refused connection, TLS, connect timeout), so that every occurrence
    counts toward the breaker."""
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return f"DNS lookup of {host} failed", True
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return f"TLS certificate of {host} not trusted ({exc.certificate_error})", True
    if isinstance(exc, aiohttp.ClientConnectorSSLError | aiohttp.ClientSSLError):
        return f"TLS handshake with {host} failed", True
    if isinstance(exc, aiohttp.ClientConnectorError):
        if isinstance(exc.os_error, ConnectionRefusedError):
            return f"connection to {host} refused", True
        return f"cannot connect to {host} ({exc.strerror or type(exc.os_error).__name__})", True
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return f"timed out connecting to {host}", True
    if isinstance(exc, aiohttp.SocketTimeoutError | aiohttp.ServerTimeoutError):
        return f"{host} sent nothing within the read timeout", False
    if isinstance(exc, TimeoutError):
        return f"{host} did not answer within the request timeout", False
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return f"{host} closed the connection", False
    return f"{type(exc).__name__} talking to {host}", False


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


def credentials_for(cfg: UpstreamConfig) -> CredentialSource | None:
    """The credential source an upstream's config describes (None: anonymous)."""
    if cfg.ecr is not None:
        return EcrCredentials(cfg.name, cfg.ecr)
    if cfg.username:
        return StaticCredentials(cfg.username, cfg.password)
    return None


class UpstreamClient:
    """Requests to one upstream registry, authenticated as that upstream asks."""

    def __init__(self, cfg: UpstreamConfig, session: aiohttp.ClientSession,
                 metrics: Metrics, credentials: CredentialSource | None = None) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self._session = session
        self._metrics = metrics
        self._ssl = ssl_context_for(cfg)
        # At most max_connections requests in flight; a wait for a slot is bounded by
        # pool_timeout and is the mirror's business, never an upstream failure.
        self._slots = asyncio.Semaphore(cfg.max_connections)
        self._in_flight = 0
        self._realms = RealmPolicy(cfg.url, cfg.token_realms)
        self._refused_realms: set[str] = set()
        self.credentials = credentials if credentials is not None else credentials_for(cfg)
        self._tokens = TokenCache()
        self._bearer: Challenge | None = None  # last bearer challenge, for proactive tokens
        self._use_basic = False
        self._token_locks: dict[str, asyncio.Lock] = {}
        self.ratelimit: dict[str, str] = {}
        self.breaker = CircuitBreaker(cfg.name, cfg.breaker_failures, cfg.breaker_cooldown)

    def url(self, path: str) -> str:
        return self.cfg.url + path

    def _timeout(self, deadline: float, *, stream: bool = False) -> aiohttp.ClientTimeout:
        """aiohttp timeouts for one request: the overall deadline as ``total`` (it covers the
        body too) except for a streamed body, which only has ``read_timeout`` per read. The
        connection itself is bounded by ``connect_timeout`` (the pool wait is ours)."""
        remaining = max(deadline - asyncio.get_running_loop().time(), 0.001)
        return aiohttp.ClientTimeout(
            total=None if stream else remaining, connect=None,
            sock_connect=self.cfg.connect_timeout, sock_read=self.cfg.read_timeout,
        )

    async def _token_for(self, challenge: Challenge, scope: str, *, fresh: bool,
                         deadline: float) -> str:
        realm, service = challenge.realm or "", challenge.params.get("service", "")
        lock = self._token_locks.setdefault(scope, asyncio.Lock())
        try:
            async with asyncio.timeout_at(deadline), lock:
                if not fresh:
                    cached = self._tokens.get(realm, service, scope)
                    if cached:
                        return cached
                basic = await self.credentials.basic() if self.credentials else None
                token, lifetime = await fetch_token(self._session, challenge, scope,
                                                    basic, self._ssl,
                                                    self._timeout(deadline), self._realms)
        except TokenError as exc:
            if exc.status in (401, 403):
                raise OCIError(ErrorCode.UNAUTHORIZED if exc.status == 401 else ErrorCode.DENIED,
                               f"upstream {self.name} refused credentials for {scope}",
                               status=exc.status) from None
            if exc.refused_realm and str(exc) not in self._refused_realms:
                self._refused_realms.add(str(exc))  # logged once, not per request
                log.error("upstream.token_realm_refused", upstream=self.name, reason=str(exc))
            raise OCIError(ErrorCode.UNKNOWN, f"upstream {self.name}: {exc}", status=502) from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            reason, _ = describe_failure(exc, urlsplit(realm).netloc or "token endpoint")
            log.warning("upstream.token_failed", upstream=self.name, reason=reason)
            raise UpstreamUnavailable(self.name, f"token endpoint: {reason}") from None
        self._tokens.put(realm, service, scope, token, lifetime)
        return token

    async def _auth_header(self, scope: str, deadline: float) -> str | None:
        if self._bearer is not None:
            realm, service = self._bearer.realm or "", self._bearer.params.get("service", "")
            cached = self._tokens.get(realm, service, scope)
            if cached:
                return f"Bearer {cached}"
            token = await self._token_for(self._bearer, scope, fresh=False, deadline=deadline)
            return f"Bearer {token}"
        if self._use_basic and self.credentials is not None:
            return await self.credentials.basic()
        return None

    async def _send(self, method: str, url: str, headers: CIMultiDict[str],
                    deadline: float | None = None, *, stream: bool = False
                    ) -> aiohttp.ClientResponse:
        """One logical request: retried with backoff on connection errors and 502/503/504,
        never on 429 (that opens the breaker for Retry-After instead). If the breaker opens
        during this request's own retries, the caller hears what failed, not only that the
        circuit is now open."""
        cfg = self.cfg
        if deadline is None:
            deadline = asyncio.get_running_loop().time() + cfg.request_timeout
        retrying = AsyncRetrying(
            stop=stop_after_attempt(cfg.max_retries + 1) | stop_after_delay(cfg.retry_max_wait),
            wait=wait_exponential_jitter(multiplier=0.1, max=max(cfg.retry_max_wait / 4, 0.1)),
            retry=retry_if_exception_type(_Retryable),
            reraise=True,
        )
        last: aiohttp.ClientResponse | None = None
        failed: OCIError | None = None
        try:
            async for attempt in retrying:
                with attempt:
                    if last is not None:
                        last.release()
                        last = None
                    try:
                        last = await self._send_once(method, url, headers, deadline,
                                                     stream=stream)
                    except _Retryable as exc:
                        if isinstance(exc.__cause__, OCIError):
                            failed = exc.__cause__
                        raise
                    if last.status in RETRY_STATUSES:
                        raise _Retryable()
        except UpstreamRejected:
            if failed is not None:
                raise failed from None
            raise
        except _Retryable:
            if last is None:  # the last attempt could not connect
                raise (failed or UpstreamUnavailable(self.name, "retries exhausted")) from None
            # attempts used up: hand the last 5xx to the caller to relay
        assert last is not None
        return last

    async def _send_once(self, method: str, url: str, headers: CIMultiDict[str],
                         deadline: float, *, stream: bool = False) -> aiohttp.ClientResponse:
        loop = asyncio.get_running_loop()
        parts = urlsplit(url)
        path, host = parts.path, parts.netloc
        if loop.time() >= deadline:
            raise UpstreamUnavailable(self.name, f"no answer within {self.cfg.request_timeout:g}s"
                                      " (request_timeout)")
        rejection = self.breaker.before_call()
        if rejection is not None:
            raise UpstreamRejected(self.name, rejection)
        start = time.monotonic()
        try:
            # The deadline bounds the wait for the response headers in every case; without
            # ``stream`` aiohttp's ``total`` also bounds reading the body later.
            async with asyncio.timeout_at(deadline):
                resp = await self._session.request(
                    method, url, headers=headers, allow_redirects=False, ssl=self._ssl,
                    timeout=self._timeout(deadline, stream=stream), auto_decompress=False,
                )
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            reason, unkeyed = describe_failure(exc, host)
            self.breaker.failure(key=None if unkeyed else f"{method} {path}", reason=reason)
            self._metrics.upstream_requests.labels(self.name, method, "error").inc()
            self._metrics.breaker_open.labels(self.name).set(int(self.breaker.is_open))
            log.warning("upstream.request_failed", upstream=self.name, method=method,
                        path=path, error=type(exc).__name__, reason=reason)
            raise _Retryable() from UpstreamUnavailable(self.name, reason)
        except BaseException:
            self.breaker.abandon()  # cancelled: no verdict on the upstream
            raise
        if resp.status == 429:
            self.breaker.failure(retry_after=retry_after_seconds(resp.headers.get("Retry-After"),
                                                                 self.cfg.breaker_cooldown),
                                 key=f"{method} {path}", reason=f"{host} answered 429")
        elif resp.status in RETRY_STATUSES:
            self.breaker.failure(key=f"{method} {path}", reason=f"{host} answered {resp.status}")
        else:
            # Any other answer, a 500 or a 404 included, shows the upstream is up: what is
            # wrong is this request's content, not the upstream's health.
            self.breaker.success()
        self._metrics.breaker_open.labels(self.name).set(int(self.breaker.is_open))
        self._metrics.upstream_requests.labels(self.name, method, str(resp.status)).inc()
        self._note_ratelimit(resp)
        log.info("upstream.request", upstream=self.name, method=method,
                 host=host, path=path, status=resp.status,
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
    async def _slot(self) -> AsyncIterator[None]:
        """One of ``max_connections`` slots, waited for at most ``pool_timeout``."""
        try:
            async with asyncio.timeout(self.cfg.pool_timeout):
                await self._slots.acquire()
        except TimeoutError:
            log.warning("upstream.pool_exhausted", upstream=self.name,
                        max_connections=self.cfg.max_connections,
                        waited_s=self.cfg.pool_timeout)
            raise UpstreamBusy(self.name, self.cfg.max_connections,
                               self.cfg.pool_timeout) from None
        self._in_flight += 1
        try:
            yield
        finally:
            self._in_flight -= 1
            self._slots.release()

    @property
    def in_flight(self) -> int:
        """Connection slots in use: requests sent or being sent, bodies not yet released."""
        return self._in_flight

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
        redirects). The body is the caller's to read (with ``read_capped`` unless it is a blob
        streamed to disk); it is released on exit.

        The whole exchange (token, retries, redirects, and reading the body) must end within
        ``request_timeout``, except the body of a blob GET, which may take as long as it
        needs while each read completes within ``read_timeout``. Bodies are asked for and
        read as ``identity``: what is hashed is what upstream sent.
        """
        scope = pull_scope(repository)
        url = self.url(path)
        if params:
            url = str(URL(url).with_query(dict(params)))
        stream = method == "GET" and "/blobs/" in path
        hdrs: CIMultiDict[str] = CIMultiDict(headers or {})
        hdrs.setdefault("Accept-Encoding", "identity")
        async with self._slot():
            deadline = asyncio.get_running_loop().time() + self.cfg.request_timeout
            auth_since = time.monotonic()
            auth = await self._auth_header(scope, deadline)
            if auth:
                hdrs["Authorization"] = auth
            resp = await self._send(method, url, hdrs, deadline, stream=stream)
            try:
                if resp.status == 401:
                    resp = await self._retry_authenticated(method, url, hdrs, scope, resp,
                                                           deadline, stream, auth_since)
                resp = await self._follow_redirects(method, url, hdrs, resp, deadline, stream)
                yield resp
            finally:
                resp.release()

    async def _retry_authenticated(self, method: str, url: str, hdrs: CIMultiDict[str],
                                   scope: str, resp: aiohttp.ClientResponse, deadline: float,
                                   stream: bool, auth_since: float) -> aiohttp.ClientResponse:
        challenges = parse_challenges(", ".join(resp.headers.getall("WWW-Authenticate", [])))
        bearer = next((c for c in challenges if c.scheme == "bearer"), None)
        basic = next((c for c in challenges if c.scheme == "basic"), None)
        if bearer is not None:
            had_token = "Authorization" in hdrs
            self._bearer = bearer
            # The challenge may ask for a wider scope than ours (e.g. catalog); use it.
            want = bearer.params.get("scope", scope)
            token = await self._token_for(bearer, want, fresh=had_token, deadline=deadline)
            hdrs["Authorization"] = f"Bearer {token}"
        elif basic is not None and self.credentials is not None:
            sent = hdrs.get("Authorization", "").startswith("Basic ")
            if sent and not self.credentials.refreshable:
                return resp  # the only credentials we have were refused
            # First Basic challenge: send the credentials. A refusal of credentials we sent:
            # one refresh (shared by concurrent refusals) and one retry.
            self._use_basic = True
            value = await self.credentials.basic(refused_since=auth_since if sent else None)
            if value is None:
                return resp
            if sent:
                log.info("upstream.credentials_refreshed", upstream=self.name)
            hdrs["Authorization"] = value
        else:
            return resp
        resp.release()
        return await self._send(method, url, hdrs, deadline, stream=stream)

    async def _follow_redirects(self, method: str, url: str, hdrs: CIMultiDict[str],
                                resp: aiohttp.ClientResponse, deadline: float | None = None,
                                stream: bool = False) -> aiohttp.ClientResponse:
        hops = 0
        origin = _origin(url)
        while resp.status in _REDIRECTS and "Location" in resp.headers and method in ("GET",
                                                                                      "HEAD"):
            hops += 1
            if hops > MAX_REDIRECTS:
                raise OCIError(ErrorCode.UNKNOWN,
                               f"upstream {self.name}: too many redirects", status=502)
            nxt = urljoin(url, resp.headers["Location"])
            why = redirect_refusal(self.cfg.url, url, nxt)
            if why is not None:
                resp.release()
                log.warning("upstream.redirect_refused", upstream=self.name,
                            location=urlsplit(nxt)._replace(query="", fragment="").geturl(),
                            reason=why)
                raise OCIError(ErrorCode.UNKNOWN, f"upstream {self.name}: redirect refused: "
                               f"{why}", status=502)
            url = nxt
            resp.release()
            if _origin(url) != origin:
                # Another origin (object storage, or a downgrade to http) gets no credentials.
                hdrs = CIMultiDict((k, v) for k, v in hdrs.items() if k.lower() != "authorization")
                origin = _origin(url)
            resp = await self._send(method, url, hdrs, deadline, stream=stream)
        return resp


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()
