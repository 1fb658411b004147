"""The daemon's metrics model: one source for every statistics view.

    Metrics.snapshot() -> kvstore.v1.Stats

`kvstore stats` (GetStats / WatchStats), the Prometheus `/metrics` endpoint and the web dashboard
all render that one message, so the three views can never disagree. The store keeps the plain
counters (hits, misses, bytes in/out, ...); this module adds what needs time: recent bandwidth
per tier (a sliding window over the byte counters, sampled by the daemon once a second) and
latency histograms of gets (acquire → release), puts (allocate → commit) and lookups (the Lookup
call), measured by the access layer around the servicer; and the history the built-in page
charts (kvstore.metrics.history, one sample per ``sample()``). Prefetch, checksum and fallback
counts are read from the store's counters by name when the store keeps them, and are 0
otherwise.

Everything runs on the daemon's event loop thread.
"""
from __future__ import annotations

import bisect
import collections
import math
import time
from typing import Callable

from kvstore.metrics.counters import saturating_add
from kvstore.metrics.history import StatsHistory
from kvstore.v1 import kvstore_pb2 as pb

# Log-spaced latency buckets, 1 µs .. ~100 s, each 20% wider than the last: a quantile read off
# a bucket's upper bound is within 20% of the truth, at a fixed cost per observation.
_FACTOR = 1.2
_BOUNDS = [1e-6 * _FACTOR ** i for i in range(int(math.log(1e8) / math.log(_FACTOR)) + 1)]
# Prometheus gets every 4th bound (about 2x apart): enough for histogram_quantile, cheap to scrape.
_EXPORT_EVERY = 4
BANDWIDTH_WINDOW_S = 5.0
_PENDING_MAX = 1 << 16   # timers of puts/gets never finished (client died) are dropped oldest first


class LatencyHistogram:
    """Counts of observations per log-spaced bucket; quantiles from the bucket upper bounds."""

    def __init__(self) -> None:
        self.counts = [0] * (len(_BOUNDS) + 1)   # the last bucket is +inf
        self.count = 0
        self.sum_s = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(_BOUNDS, seconds)] += 1
        self.count += 1
        self.sum_s += seconds

    def quantile(self, q: float) -> float:
        return bucket_quantile(self.counts, q) if self.count else 0.0

    def summary(self) -> pb.LatencySummary:
        upper, cumulative = [], []
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if i == len(_BOUNDS) or (i + 1) % _EXPORT_EVERY == 0:
                upper.append(_BOUNDS[i] if i < len(_BOUNDS) else math.inf)
                cumulative.append(seen)
        return pb.LatencySummary(count=self.count, sum_s=self.sum_s, p50_s=self.quantile(0.5),
                                 p99_s=self.quantile(0.99), bucket_upper_s=upper,
                                 bucket_counts=cumulative)


def bucket_quantile(counts, q: float) -> float | None:
    """The q-quantile of per-bucket counts (LatencyHistogram.counts, or the difference of two
    of its snapshots: a window's observations), as the bucket's upper bound; None if empty."""
    total = sum(counts)
    if not total:
        return None
    rank = q * total
    seen = 0
    for i, c in enumerate(counts):
        seen += c
        if seen >= rank and c:
            return _BOUNDS[i] if i < len(_BOUNDS) else _BOUNDS[-1]
    return _BOUNDS[-1]


class RateMeter:
    """Recent rate of a monotonically growing counter: the slope over the last window_s."""

    def __init__(self, window_s: float = BANDWIDTH_WINDOW_S):
        self.window_s = window_s
        self.samples: collections.deque[tuple[float, int]] = collections.deque()

    def sample(self, now: float, value: int) -> None:
        self.samples.append((now, value))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window_s:
            self.samples.popleft()

    def rate(self) -> float:
        if len(self.samples) < 2:
            return 0.0
        (t0, v0), (t1, v1) = self.samples[0], self.samples[-1]
        return (v1 - v0) / (t1 - t0) if t1 > t0 else 0.0


class Metrics:
    """Time-based metrics around the store's counters; ``snapshot()`` is the one Stats model.

    base: builds the counters-only Stats message from the store (service.stats_message).
    history_samples: how many ``sample()`` calls the history keeps (the daemon samples once a
    second: 600 is ten minutes).
    """

    def __init__(self, store, base: Callable[[], pb.Stats], clock=time.monotonic,
                 history_samples: int = 600, wall_clock=time.time):
        self.store = store
        self._base = base
        self.clock = clock
        self.get_latency: dict[int, LatencyHistogram] = collections.defaultdict(LatencyHistogram)
        self.put_latency: dict[int, LatencyHistogram] = collections.defaultdict(LatencyHistogram)
        self.lookup_latency = LatencyHistogram()
        self.history = StatsHistory(history_samples)
        self._sampled_counts: dict[str, list[int]] = {}
        self._wall_clock = wall_clock
        self._read: dict[int, RateMeter] = collections.defaultdict(RateMeter)
        self._write: dict[int, RateMeter] = collections.defaultdict(RateMeter)
        self._puts: collections.OrderedDict[int, float] = collections.OrderedDict()
        self._gets: collections.OrderedDict[int, tuple[float, int]] = collections.OrderedDict()
        self.recompute_fallbacks = 0
        self.recompute_fallback_blocks = 0
        self.requests_throttled = 0
        self.auth_failures = 0

    # -- timing of puts and gets (called by the access layer) --------------------------------
    def put_started(self, allocation_id: int, t0: float) -> None:
        _bounded_put(self._puts, allocation_id, t0)

    def put_finished(self, allocation_id: int, committed: bool) -> None:
        t0 = self._puts.pop(allocation_id, None)
        if t0 is not None and committed:
            self.put_latency[pb.TIER_DRAM].observe(self.clock() - t0)  # new blocks land in DRAM

    def get_started(self, lease_id: int, tier: int, t0: float) -> None:
        _bounded_put(self._gets, lease_id, (t0, tier))

    def get_finished(self, lease_id: int, waited_s: float = 0.0) -> None:
        """The lease ended; ``waited_s``: how long its release waited in the client after the
        get had finished (a release held back for the client's next call)."""
        started = self._gets.pop(lease_id, None)
        if started is not None:
            t0, tier = started
            self.get_latency[tier].observe(max(0.0, self.clock() - t0 - waited_s))

    def lookup_finished(self, t0: float) -> None:
        """A Lookup call that began at ``t0`` (this clock) has answered."""
        self.lookup_latency.observe(self.clock() - t0)

    def gets_reported(self, seconds) -> None:
        """Lease-free DRAM gets a client timed itself (ReportReads): no Acquire to time."""
        hist = self.get_latency[pb.TIER_DRAM]
        for s in seconds:
            hist.observe(s)

    def fallbacks_reported(self, count: int, blocks: int) -> None:
        self.recompute_fallbacks = saturating_add(self.recompute_fallbacks, count)
        self.recompute_fallback_blocks = saturating_add(self.recompute_fallback_blocks, blocks)

    # -- sampling and the snapshot -----------------------------------------------------------
    def sample(self) -> None:
        """Record the byte counters now and append a sample to the history (the daemon calls
        this about once a second)."""
        now = self.clock()
        st = self._base()
        for t in st.tiers:
            self._read[t.tier].sample(now, t.bytes_out)
            self._write[t.tier].sample(now, t.bytes_in)
        hists = {f"get:{pb.Tier.Name(tier).removeprefix('TIER_')}": h
                 for tier, h in self.get_latency.items()}
        hists["lookup"] = self.lookup_latency
        quantiles = {}
        for key, h in hists.items():
            # The page wants latency of the last interval, not since start: the difference
            # of the bucket counts since the previous sample.
            prev = self._sampled_counts.get(key)
            window = [a - b for a, b in zip(h.counts, prev)] if prev else h.counts
            self._sampled_counts[key] = list(h.counts)
            quantiles[key] = (bucket_quantile(window, 0.5), bucket_quantile(window, 0.99))
        self.history.record(self._wall_clock(), now, self._complete(st), quantiles)

    def snapshot(self) -> pb.Stats:
        return self._complete(self._base())

    def _complete(self, st: pb.Stats) -> pb.Stats:
        """The counters-only ``st`` with this module's figures added (in place)."""
        for t in st.tiers:
            total = t.hits + t.misses
            t.hit_rate = t.hits / total if total else 0.0
            # A tier that measures its own bandwidth (the remote tier's fills) keeps it.
            if not t.read_bps and t.tier in self._read:
                t.read_bps = self._read[t.tier].rate()
            if not t.write_bps and t.tier in self._write:
                t.write_bps = self._write[t.tier].rate()
            t.get_latency.CopyFrom(self.get_latency[t.tier].summary()
                                   if t.tier in self.get_latency else LatencyHistogram().summary())
            t.put_latency.CopyFrom(self.put_latency[t.tier].summary()
                                   if t.tier in self.put_latency else LatencyHistogram().summary())
        # Tiers that verify checksums count failures per tier; the daemon total sums them.
        st.checksum_failures = sum(int(getattr(t, "checksum_failures", 0)) for t in st.tiers)
        st.recompute_fallbacks = self.recompute_fallbacks
        st.recompute_fallback_blocks = self.recompute_fallback_blocks
        st.requests_throttled = self.requests_throttled
        st.auth_failures = self.auth_failures
        st.lookup_latency.CopyFrom(self.lookup_latency.summary())
        return st


def _bounded_put(d: collections.OrderedDict, key, value) -> None:
    d[key] = value
    if len(d) > _PENDING_MAX:
        d.popitem(last=False)
