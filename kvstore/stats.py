"""Counters the daemon keeps. One model; the CLI table, gRPC and metrics views read from it."""
from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass
class TierCounters:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    promotions: int = 0
    demotions: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class DaemonCounters:
    lookups: int = 0
    puts_rejected: int = 0
    leases_expired: int = 0
    allocations_expired: int = 0
    sessions_reclaimed: int = 0
