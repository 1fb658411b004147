"""A token bucket that caps a tier's read bandwidth (``ssd_read_limit``).

A testing and QoS knob, not a performance feature: it lets a benchmark show the load/recompute
crossover on any machine (a fast NVMe or the page cache hides it), and lets an operator keep
cache reads from starving other users of a shared disk. Thread-safe: the SSD I/O threads call
``take`` before each read and sleep until the bucket holds enough tokens.
"""
from __future__ import annotations

import threading
import time


class TokenBucket:
    """At most ``rate_bps`` bytes per second on average, bursts up to ``burst_bytes``."""

    def __init__(self, rate_bps: float, burst_bytes: int | None = None, clock=time.monotonic,
                 sleep=time.sleep):
        if not rate_bps > 0:
            raise ValueError(f"rate must be positive, got {rate_bps}")
        self.rate_bps = float(rate_bps)
        # A small burst (10 ms of traffic, at least 64 KiB): the cap holds over short windows.
        self.burst_bytes = int(burst_bytes if burst_bytes is not None
                               else max(rate_bps / 100, 64 << 10))
        self._clock, self._sleep = clock, sleep
        self._lock = threading.Lock()
        self._tokens = float(self.burst_bytes)
        self._at = clock()

    def take(self, nbytes: int) -> float:
        """Reserve nbytes and sleep until they are covered; returns seconds slept.

        Reservations may drive the bucket negative (a read larger than the burst): later callers
        then wait their turn, so concurrent readers share the rate instead of exceeding it."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst_bytes, self._tokens + (now - self._at) * self.rate_bps)
            self._at = now
            self._tokens -= nbytes
            wait_s = -self._tokens / self.rate_bps if self._tokens < 0 else 0.0
        if wait_s > 0:
            self._sleep(wait_s)
        return wait_s
