"""Routers of the trace replay: which host serves each request.

    RoundRobin          request i goes to host i mod N: no cache knowledge (the baseline)
    KVAwareRouter       the longest cached prefix according to a PrefixIndex (fed by the
                        daemons' KV events), among hosts whose recent load is not above
                        ``load_bound`` x the mean; ties go to the least loaded host

Why the load bound: every request of a conversation trace shares its first block (the system
prompt), so a router that only maximises overlap finds one host ahead on every request and
sends it everything — one cache doing the work of N, the others idle. Bounding each host's
share of the recent requests keeps the fleet's capacity in use and the load balanced, at the
cost of sending a request to a host with a shorter prefix when its best host is busy.
"""
from __future__ import annotations

from collections import deque
from typing import Protocol, Sequence


class PrefixIndex(Protocol):
    """What a cache-aware router knows about the hosts' caches."""

    def overlaps(self, keys: Sequence[bytes], hash_ids: Sequence[int]) -> list[int]:
        """For each host, the number of leading blocks of the request (its block keys, and the
        trace's hash ids of the same blocks) that host is known to hold."""
        ...


class RoundRobin:
    name = "round-robin"

    def __init__(self, hosts: int):
        self.hosts = hosts
        self._next = 0

    def pick(self, keys: Sequence[bytes], hash_ids: Sequence[int]) -> int:
        h = self._next
        self._next = (h + 1) % self.hosts
        return h


class KVAwareRouter:
    """Longest known prefix among the hosts not overloaded (see the module docstring).

    A host is overloaded when its share of the last ``window`` requests is above
    ``load_bound`` x the mean share; the least loaded host never is, so there is always a
    candidate. Among candidates: the longest overlap, then the fewest recent requests, then
    the fewest requests overall, then the lowest host number."""
    name = "kv-aware"

    def __init__(self, hosts: int, index: PrefixIndex, load_bound: float = 1.2,
                 window: int = 64):
        if hosts < 1 or load_bound < 1.0 or window < 1:
            raise ValueError("hosts >= 1, load_bound >= 1 and window >= 1 are required")
        self.hosts = hosts
        self.index = index
        self.load_bound = load_bound
        self._recent: deque[int] = deque(maxlen=window)
        self._recent_load = [0] * hosts
        self._total = [0] * hosts
        self.overlap_blocks = 0       # sum of the chosen hosts' known overlaps

    def pick(self, keys: Sequence[bytes], hash_ids: Sequence[int]) -> int:
        overlap = self.index.overlaps(keys, hash_ids)
        load = self._recent_load
        limit = self.load_bound * len(self._recent) / self.hosts
        candidates = [h for h in range(self.hosts) if not self._recent or load[h] <= limit]
        best = min(candidates, key=lambda h: (-overlap[h], load[h], self._total[h], h))
        self._record(best)
        self.overlap_blocks += overlap[best]
        return best

    def _record(self, host: int) -> None:
        if len(self._recent) == self._recent.maxlen:
            self._recent_load[self._recent[0]] -= 1
        self._recent.append(host)
        self._recent_load[host] += 1
        self._total[host] += 1
