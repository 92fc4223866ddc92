"""Amazon ECR upstreams: Basic credentials from ``GetAuthorizationToken`` (aiobotocore).

An upstream with ``type: ecr`` (or whose URL is ``<account>.dkr.ecr.<region>.amazonaws.com``)
authenticates as ``AWS:<password>`` with the password ECR hands out for ``registry_id``
(cross-account ids work when the caller's IAM policy allows it). Credentials come from
aiobotocore's default chain (environment, shared files, web identity / IRSA, instance role),
optionally a named ``profile``; never from the config file.

The token is kept until ``REFRESH_MARGIN`` before its ``expiresAt`` (ECR tokens live 12 h) and
refreshed single-flight. Whatever ``expiresAt`` says, a token is kept at least
``MIN_TOKEN_LIFETIME`` (60 s): an ``expiresAt`` in the past (moto returns 2015-01-01) or a
skewed clock costs at most one token call a minute, never one per request. A 401 to a token
forces one refresh (upstream/client.py retries once with it).
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import structlog
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession, get_session
from botocore.exceptions import BotoCoreError, ClientError

from mirrorcache.config import ECR_HOST_RE, EcrConfig
from mirrorcache.errors import ErrorCode, OCIError

log = structlog.get_logger("mirrorcache.upstream.ecr")

#: Refresh this long before ``expiresAt``.
REFRESH_MARGIN = 300.0
#: The shortest time a fetched token is used, whatever its ``expiresAt`` says.
MIN_TOKEN_LIFETIME = 60.0
#: One GetAuthorizationToken call (all of botocore's own retries) must end within this.
TOKEN_CALL_TIMEOUT = 30.0

def parse_ecr_host(host: str) -> tuple[str, str] | None:
    """``(registry_id, region)`` of an ECR registry host name, or None."""
    m = ECR_HOST_RE.fullmatch(host.lower().split(":", 1)[0])
    return (m.group("registry_id"), m.group("region")) if m else None


class EcrCredentials:
    """A :class:`~mirrorcache.upstream.credentials.CredentialSource` over ECR tokens."""

    refreshable = True

    def __init__(self, upstream: str, cfg: EcrConfig, session: AioSession | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.upstream = upstream
        self.cfg = cfg
        self._session = session
        self._clock = clock
        self._lock = asyncio.Lock()
        self._header: str | None = None
        self._valid_until = 0.0
        self._fetched_at = float("-inf")
        #: GetAuthorizationToken calls made (for metrics and tests).
        self.calls = 0

    def _current(self, refused_since: float | None) -> str | None:
        if self._header is None or self._clock() >= self._valid_until:
            return None
        if refused_since is not None and self._fetched_at <= refused_since:
            return None  # the refused header is this one: refresh
        return self._header

    async def basic(self, *, refused_since: float | None = None) -> str | None:
        current = self._current(refused_since)
        if current is not None:
            return current
        async with self._lock:  # single flight: waiters find the fresh token
            current = self._current(refused_since)
            if current is not None:
                return current
            self._header, lifetime = await self._fetch()
            self._fetched_at = self._clock()
            self._valid_until = self._fetched_at + lifetime
            return self._header

    async def _fetch(self) -> tuple[str, float]:
        session = self._session
        if session is None:
            session = AioSession(profile=self.cfg.profile) if self.cfg.profile else get_session()
        config = AioConfig(retries={"max_attempts": 3, "mode": "standard"},
                           connect_timeout=10, read_timeout=20)
        self.calls += 1
        try:
            async with asyncio.timeout(TOKEN_CALL_TIMEOUT), session.create_client(
                    "ecr", region_name=self.cfg.region, endpoint_url=self.cfg.endpoint_url,
                    config=config) as ecr:
                resp: dict[str, Any] = await ecr.get_authorization_token(
                    registryIds=[self.cfg.registry_id])
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "error")
            log.warning("upstream.ecr_token_failed", upstream=self.upstream, reason=code)
            raise OCIError(ErrorCode.UNAUTHORIZED, f"upstream {self.upstream}: ECR refused "
                           f"GetAuthorizationToken ({code})", status=401) from None
        except (BotoCoreError, OSError, TimeoutError) as exc:
            log.warning("upstream.ecr_token_failed", upstream=self.upstream,
                        reason=type(exc).__name__)
            raise OCIError(ErrorCode.UNAVAILABLE, f"upstream {self.upstream}: ECR "
                           f"GetAuthorizationToken failed ({type(exc).__name__})",
                           status=503) from None
        try:
            data = resp["authorizationData"][0]
            user, _, password = base64.b64decode(data["authorizationToken"]).decode().partition(
                ":")
        except (KeyError, IndexError, ValueError, UnicodeDecodeError):
            raise OCIError(ErrorCode.UNKNOWN, f"upstream {self.upstream}: unusable ECR token",
                           status=502) from None
        expires = data.get("expiresAt")
        remaining = ((expires - datetime.now(UTC)).total_seconds()
                     if isinstance(expires, datetime) else 0.0)
        lifetime = max(remaining - REFRESH_MARGIN, MIN_TOKEN_LIFETIME)
        log.info("upstream.ecr_token_fetched", upstream=self.upstream,
                 registry_id=self.cfg.registry_id, valid_for_s=round(lifetime))
        header = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        return header, lifetime
