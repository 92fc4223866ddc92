"""Failed logins per client address, in a sliding window, owned by the app."""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable


class FailedLoginLimiter:
    """After ``limit`` failed logins from one address within ``window`` seconds, that
    address is refused until the oldest failure leaves the window.

    A login attempt is counted *before* its credentials are checked (:meth:`reserve`) and
    given back when they prove right (:meth:`release`), so concurrent attempts cannot all
    pass the check before any failure is recorded: at most ``limit`` checks from one
    address run per window, the rest are refused at once.

    Memory is bounded: at most ``max_addresses`` addresses are tracked (least recently
    failing dropped first).
    """

    def __init__(self, limit: int, window: float, *, clock: Callable[[], float] = time.monotonic,
                 max_addresses: int = 65536) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock
        self._max = max_addresses
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, address: str) -> deque[float] | None:
        times = self._failures.get(address)
        if times is None:
            return None
        cutoff = self._clock() - self.window
        while times and times[0] <= cutoff:
            times.popleft()
        if not times:
            del self._failures[address]
            return None
        return times

    def retry_after(self, address: str) -> float | None:
        """Seconds until ``address`` may try again, or None if it is not limited."""
        if self.limit <= 0:
            return None
        times = self._recent(address)
        if times is None or len(times) < self.limit:
            return None
        return max(times[0] + self.window - self._clock(), 0.001)

    def reserve(self, address: str) -> float | None:
        """Count one login attempt from ``address`` as failed until :meth:`release` says
        otherwise; None if it may go ahead, else the seconds until it may try again (and
        nothing is counted)."""
        wait = self.retry_after(address)
        if wait is None and self.limit > 0:
            self.failure(address)
        return wait

    def release(self, address: str) -> None:
        """The attempt reserved for ``address`` succeeded: give its slot back."""
        times = self._failures.get(address)
        if times:
            times.pop()
            if not times:
                del self._failures[address]

    def failure(self, address: str) -> None:
        """Record one failed login from ``address``."""
        times = self._recent(address)
        if times is None:
            times = self._failures[address] = deque(maxlen=max(self.limit, 1))
        self._failures.move_to_end(address)
        times.append(self._clock())
        while len(self._failures) > self._max:
            self._failures.popitem(last=False)
