"""A circuit breaker: stop calling a remote that keeps failing, and probe it again later.

    closed     calls go through; ``failures_to_open`` failures in a row open the circuit
    open       calls are refused at once (the caller treats that as a miss) for ``cooldown_s``
    half_open  after the cooldown one call goes through as a probe: success closes the
               circuit, failure opens it for another (doubled, capped) cooldown

Single-threaded: the remote tier calls it from the daemon's event loop only.
"""
from __future__ import annotations

import time

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class CircuitBreaker:
    def __init__(self, failures_to_open: int = 3, cooldown_s: float = 1.0,
                 max_cooldown_s: float = 10.0, clock=time.monotonic):
        self.failures_to_open = failures_to_open
        self.base_cooldown_s = cooldown_s
        self.max_cooldown_s = max_cooldown_s
        self.clock = clock
        self.state = CLOSED
        self.failures = 0
        self.opened = 0          # times the circuit opened (a counter for stats)
        self._cooldown_s = cooldown_s
        self._retry_at = 0.0

    def allow(self) -> bool:
        """May a call go out now? In half_open only the one probe may."""
        if self.state == CLOSED:
            return True
        now = self.clock()
        if now < self._retry_at:
            return False
        # open → half_open; a half_open probe that never reported back is retried as well
        self.state = HALF_OPEN
        self._retry_at = now + self._cooldown_s
        return True

    def success(self) -> None:
        self.state = CLOSED
        self.failures = 0
        self._cooldown_s = self.base_cooldown_s

    def failure(self) -> None:
        self.failures += 1
        if self.state == HALF_OPEN:
            self._cooldown_s = min(self._cooldown_s * 2, self.max_cooldown_s)
            self._open()
        elif self.state == CLOSED and self.failures >= self.failures_to_open:
            self._open()

    def _open(self) -> None:
        self.state = OPEN
        self.opened += 1
        self._retry_at = self.clock() + self._cooldown_s
