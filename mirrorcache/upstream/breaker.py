"""A circuit breaker per upstream: after repeated failures, leave the upstream alone a while.

Only failures that say something about the upstream's health are reported here (connection
errors, timeouts, 502/503/504, 429: see ``UpstreamClient``); an answer such as a 500 or a 404
for one request's content is a success as far as the breaker is concerned. Failures are
counted by *key* (the request path): the same path failing again counts once, so one client
repeating one bad request cannot open the circuit for everyone. Transport failures that no
request content can cause (DNS, refused connection, TLS) are reported without a key and each
one counts.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import structlog

log = structlog.get_logger("mirrorcache.upstream.breaker")

#: The longest a single 429 Retry-After may keep an upstream's circuit open.
MAX_RETRY_AFTER = 3600.0


class State(Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a call was not let through, and for how long the circuit stays open."""

    retry_after: float
    rate_limited: bool
    #: What the last counted failure was (e.g. "connection refused"), for the error message.
    reason: str | None = None


class CircuitBreaker:
    """Closed: calls pass, consecutive failures are counted. Open: calls fail fast until the
    cooldown ends. Half-open: one probe at a time; its success closes, its failure reopens."""

    def __init__(self, name: str, failures: int, cooldown: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self._threshold = failures
        self._cooldown = cooldown
        self._clock = clock
        self._failures = 0
        self._failing: set[str] = set()
        self._anonymous = 0
        self.last_reason: str | None = None
        self._open_until = 0.0
        self._rate_limited = False
        self._probing = False
        self.state = State.CLOSED

    def before_call(self) -> Rejection | None:
        """None to go ahead, else a Rejection (fail fast)."""
        now = self._clock()
        if self.state is State.OPEN:
            if now < self._open_until:
                return Rejection(self._open_until - now, self._rate_limited, self.last_reason)
            self.state = State.HALF_OPEN
            self._probing = False
            log.info("upstream.breaker_half_open", upstream=self.name)
        if self.state is State.HALF_OPEN:
            if self._probing:
                return Rejection(1.0, self._rate_limited, self.last_reason)
            self._probing = True
        return None

    def success(self) -> None:
        if self.state is not State.CLOSED:
            log.info("upstream.breaker_closed", upstream=self.name)
        self.state = State.CLOSED
        self._failures = 0
        self._failing.clear()
        self._anonymous = 0
        self._probing = False
        self._rate_limited = False

    def abandon(self) -> None:
        """A call let through ended without a verdict (cancelled, or refused before reaching
        the upstream): let the next call probe instead."""
        self._probing = False

    def failure(self, retry_after: float | None = None, *, key: str | None = None,
                reason: str | None = None) -> None:
        """Count a failure; a rate limit (``retry_after`` given) opens the circuit at once.

        With a ``key``, repeated failures of the same key count once toward the threshold.
        """
        if key is None:
            self._anonymous += 1
        elif len(self._failing) < 10_000:
            self._failing.add(key)
        self._failures = self._anonymous + len(self._failing)
        if reason is not None:
            self.last_reason = reason
        self._probing = False
        if retry_after is not None:
            self._open(min(max(retry_after, 1.0), MAX_RETRY_AFTER), rate_limited=True)
        elif self.state is State.HALF_OPEN or self._failures >= self._threshold:
            self._open(self._cooldown, rate_limited=False)

    def _open(self, seconds: float, *, rate_limited: bool) -> None:
        until = self._clock() + seconds
        if self.state is State.OPEN and until <= self._open_until:
            return
        self.state = State.OPEN
        self._open_until = until
        self._rate_limited = rate_limited
        log.warning("upstream.breaker_open", upstream=self.name, seconds=round(seconds, 1),
                    failures=self._failures, rate_limited=rate_limited,
                    last_error=self.last_reason)

    @property
    def is_open(self) -> bool:
        return self.state is State.OPEN and self._clock() < self._open_until
