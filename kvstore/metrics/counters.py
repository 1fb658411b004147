"""Counters the daemon keeps. One model; the CLI table, gRPC and metrics views read from it."""
from __future__ import annotations

from dataclasses import dataclass

UINT64_MAX = (1 << 64) - 1   # every counter is a uint64 in kvstore.v1.Stats


def saturating_add(total: int, n: int) -> int:
    """``total + n`` held at UINT64_MAX: a counter that would overflow its uint64 field stays at
    the maximum instead of making every statistics view fail to serialize."""
    return min(total + max(n, 0), UINT64_MAX)


@dataclass
class TierCounters:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    promotions: int = 0
    demotions: int = 0

    def count_get(self, hits: int, misses: int, bytes_out: int) -> None:
        """One get: blocks served from this tier, blocks asked for and not served, bytes."""
        self.hits += hits
        self.misses += misses
        self.bytes_out += bytes_out


@dataclass
class DaemonCounters:
    lookups: int = 0
    reads_reported: int = 0      # blocks same-host clients read without a lease (report_reads)
    puts_rejected: int = 0
    leases_expired: int = 0
    allocations_expired: int = 0
    sessions_reclaimed: int = 0
