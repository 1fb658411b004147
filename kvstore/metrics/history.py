"""A short history of the Stats model for the built-in page: a ring of compact samples.

    StatsHistory(capacity).record(wall_s, mono_s, stats, latency)   # the daemon, once a second
    StatsHistory.since(after_wall_s) -> dict                        # GET /api/history

Each sample holds what the page charts, already as rates over the interval since the previous
sample (evictions per second, hit ratio of that interval's gets, ...), so a page opened late
draws the same lines as one that was open all along, and needs no state of its own. Counters
that went backwards (nothing here resets them; a guard all the same) give a rate of 0.

The ring is bounded (``capacity`` samples, oldest dropped) and holds plain numbers: about 1 KB a
sample with three tiers, so ten minutes at one a second is well under a megabyte.
"""
from __future__ import annotations

import collections

from kvstore.v1 import kvstore_pb2 as pb

# Daemon-wide counters charted as per-second rates: name in the sample -> field of Stats.
_DAEMON_RATES = {
    "prefetch_on_time_ps": "prefetch_on_time",
    "prefetch_late_ps": "prefetch_late",
    "prefetch_wasted_ps": "prefetch_wasted",
    "checksum_failures_ps": "checksum_failures",
    "auth_failures_ps": "auth_failures",
    "requests_throttled_ps": "requests_throttled",
    "puts_rejected_ps": "puts_rejected",
    "recompute_fallbacks_ps": "recompute_fallbacks",
    "lookups_ps": "lookups",
}
_TIER_RATES = {"evictions_ps": "evictions", "promotions_ps": "promotions",
               "demotions_ps": "demotions", "io_errors_ps": "io_errors",
               "timeouts_ps": "timeouts"}


class StatsHistory:
    """The last ``capacity`` samples, oldest first. Owned by kvstore.metrics.model.Metrics
    (the only writer); the metrics port reads it through ``since``."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"history capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._samples: collections.deque[dict] = collections.deque(maxlen=capacity)
        self._prev: tuple[float, pb.Stats] | None = None

    def record(self, wall_s: float, mono_s: float, st: pb.Stats,
               latency: dict[str, tuple[float | None, float | None]]) -> None:
        """Append one sample taken at ``wall_s`` (Unix time, for the page's clock) and
        ``mono_s`` (monotonic, for rates). ``latency``: "get:TIER" or "lookup" -> (p50, p99)
        seconds of the interval's observations, None where there were none."""
        prev = self._prev
        dt = mono_s - prev[0] if prev is not None else 0.0
        before = prev[1] if prev is not None and dt > 0 else None
        old_tiers = {t.tier: t for t in before.tiers} if before is not None else {}

        def rate(now: int, then: int | None) -> float:
            return max(now - then, 0) / dt if then is not None else 0.0

        tiers = {}
        for t in st.tiers:
            name = pb.Tier.Name(t.tier).removeprefix("TIER_")
            o = old_tiers.get(t.tier)
            row = {"used_bytes": t.used_bytes, "capacity_bytes": t.capacity_bytes,
                   "blocks": t.blocks, "read_bps": t.read_bps, "write_bps": t.write_bps}
            for key, field in _TIER_RATES.items():
                row[key] = rate(getattr(t, field), getattr(o, field) if o else None)
            asked = (t.hits + t.misses - o.hits - o.misses) if o else 0
            row["hit_ratio"] = (t.hits - o.hits) / asked if asked > 0 else None
            row["get_p50_s"], row["get_p99_s"] = latency.get(f"get:{name}", (None, None))
            if t.tier == pb.TIER_REMOTE:
                row["queue_depth"] = t.queue_depth
                row["circuit_open"] = int(t.circuit_state == "open")
            tiers[name] = row
        sample = {"t": wall_s, "tiers": tiers}
        for key, field in _DAEMON_RATES.items():
            sample[key] = rate(getattr(st, field), getattr(before, field) if before else None)
        sample["lookup_p50_s"], sample["lookup_p99_s"] = latency.get("lookup", (None, None))
        self._samples.append(sample)
        self._prev = (mono_s, st)

    def since(self, after_wall_s: float = 0.0) -> dict:
        """The samples taken after ``after_wall_s`` (0: all), oldest first, with the ring's
        size, as a JSON-ready dict."""
        return {"capacity": self.capacity,
                "samples": [s for s in self._samples if s["t"] > after_wall_s]}

    def __len__(self) -> int:
        return len(self._samples)
