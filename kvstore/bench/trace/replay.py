"""Replaying a trace against a fleet of real daemons, and what it served.

Per request, on the host the router picks: lookup of the request's block chain; get of the
longest stored prefix (into a numpy buffer, every byte compared with the bytes derived from
each block's key); put of the rest of the chain (parent: the last block served), in the
background — a later request's lookup of the same keys waits for it (the SDK's
read-your-writes), and at most ``inflight`` puts per host are in flight.

A block is counted served from the tier the lookup named for it, and only if the get returned
it; everything else of the prompt is recomputed. Any error of a request's get or put counts
its blocks as recomputed (and the error), as an engine degrades to recompute.
"""
from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np

from kvstore.bench.trace.workload import Trace, block_bytes_of

TIERS = ("HBM", "DRAM", "SSD", "REMOTE")


@dataclass
class ReplayResult:
    requests: int = 0
    block_refs: int = 0
    served_by_tier: Counter = field(default_factory=Counter)
    wrong_bytes: int = 0
    wrong_blocks: int = 0
    errors: int = 0
    first_error: str = ""
    requests_per_host: list[int] = field(default_factory=list)
    wall_s: float = 0.0
    trace_s: float = 0.0

    @property
    def served(self) -> int:
        return sum(self.served_by_tier.values())

    @property
    def hit_ratio(self) -> float:
        return self.served / self.block_refs if self.block_refs else 0.0

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.wall_s if self.wall_s else 0.0

    @property
    def speed_x(self) -> float:
        """How many times faster than the trace's own arrival rate the replay ran."""
        return self.trace_s / self.wall_s if self.wall_s else 0.0

    @property
    def load_max_over_mean(self) -> float:
        n = self.requests_per_host
        return max(n) / (sum(n) / len(n)) if n and sum(n) else 0.0

    def to_json(self) -> dict:
        refs = self.block_refs or 1
        return {"hit_ratio": self.hit_ratio,
                "served_fraction": {t: self.served_by_tier.get(t, 0) / refs for t in TIERS
                                    if t != "HBM" or self.served_by_tier.get(t)},
                "recomputed_fraction": 1.0 - self.served / refs,
                "requests": self.requests, "block_refs": self.block_refs,
                "requests_per_host": self.requests_per_host,
                "load_max_over_mean": self.load_max_over_mean,
                "wrong_bytes": self.wrong_bytes, "wrong_blocks": self.wrong_blocks,
                "errors": self.errors, "first_error": self.first_error,
                "wall_s": self.wall_s, "requests_per_s": self.requests_per_s,
                "replay_speed_x": self.speed_x}


def replay(trace: Trace, fleet, router, pace_x: float = 0.0, inflight: int = 4,
           before_pick=None, progress=None, timeout_s: float = 60.0) -> ReplayResult:
    """Replay ``trace`` on ``fleet`` (kvstore.bench.trace.hosts.Fleet), the host of each request
    chosen by ``router.pick(keys, hash_ids)``. ``pace_x`` > 0 replays at that multiple of the
    trace's arrival times (0: as fast as possible). ``before_pick()`` runs before each routing
    decision (a router's index takes in the events published so far). ``progress(i)`` is
    called every 500 requests."""
    hosts = fleet.hosts
    res = ReplayResult(requests_per_host=[0] * len(hosts), trace_s=trace.duration_s)
    layout = hosts[0].ns.layout
    bb = layout.block_bytes
    out = np.empty((max((len(r.blocks) for r in trace.requests), default=1),
                    *layout.block_shape), dtype=np.uint8)
    puts: list[deque] = [deque() for _ in hosts]
    t_first = trace.requests[0].arrival_s if trace.requests else 0.0
    t0 = time.perf_counter()

    def settle(q: deque, keep: int) -> None:
        while len(q) > keep:
            try:
                q.popleft().result(timeout=timeout_s)
            except Exception as exc:        # the blocks stay uncached: later misses
                _error(res, exc)

    for i, req in enumerate(trace.requests):
        if pace_x > 0:
            wait = (req.arrival_s - t_first) / pace_x - (time.perf_counter() - t0)
            if wait > 0:
                time.sleep(wait)
        if progress is not None and i and i % 500 == 0:
            progress(i)
        blocks = req.blocks.tolist()
        keys = [trace.keys[b] for b in blocks]
        if before_pick is not None:
            before_pick()
        h = router.pick(keys, [trace.hash_ids[b] for b in blocks])
        host = hosts[h]
        res.requests += 1
        res.block_refs += len(keys)
        res.requests_per_host[h] += 1
        served = 0
        try:
            found = host.ns.lookup(keys)
            if found.num_cached:
                got = host.ns.get(keys[:found.num_cached], out=out).result(timeout=timeout_s)
                served = len(got)
                if served:
                    rows = got.reshape(served, bb)
                    bad = rows != block_bytes_of(keys[:served], bb)
                    wrong = int(bad.sum())
                    if wrong:
                        res.wrong_bytes += wrong
                        res.wrong_blocks += int(bad.any(axis=1).sum())
                    res.served_by_tier.update(found.tiers[:served])
        except Exception as exc:
            _error(res, exc)
        rest = keys[served:]
        if rest:
            data = block_bytes_of(rest, bb).reshape(len(rest), *layout.block_shape)
            try:
                puts[h].append(host.ns.put(rest, data,
                                           parent_key=keys[served - 1] if served else None))
            except Exception as exc:
                _error(res, exc)
            settle(puts[h], inflight)
    for q in puts:
        settle(q, 0)
    res.wall_s = time.perf_counter() - t0
    return res


def _error(res: ReplayResult, exc: BaseException) -> None:
    res.errors += 1
    if not res.first_error:
        res.first_error = f"{type(exc).__name__}: {exc}"[:300]
