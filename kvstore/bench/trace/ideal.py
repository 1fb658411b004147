"""Ideal prefix caches over a trace, the yardsticks of the replay: how many block references an
infinite cache, Belady's offline optimum and LRU would serve.

Every function takes the requests' chains (dense block ids, root first) and returns the number
of block references served: per request, the longest prefix of its chain that is in the cache
when it arrives (a block is only useful if every block before it is cached too); then the whole
chain is referenced (hits touched, misses admitted), as the replay's put of the rest does.

    infinite_hits(chains)              nothing is ever evicted: the upper bound at any capacity
    lru_hits(chains, capacity)         least recently used block evicted first
    belady_hits(chains, capacity)      the block used again farthest in the future evicted first

What "optimum" means for a prefix workload: count a reference a *paging* hit when its block is
cached, whether or not its prefix is. Every prefix hit is a paging hit, so no policy serves more
prefix hits than the best paging policy does paging hits — and that is Belady's MIN with bypass
(evict, among the cached blocks and the incoming one, the one whose next use is farthest; the
incoming one evicted means not admitted). A block's next use is never earlier than its parent's
(every request holding it holds its parent), and ties go to the deeper block, so MIN evicts a
block's descendants before the block: its cache stays prefix-closed, every paging hit is a
prefix hit, and its count is the optimum of prefix caches of that capacity.
"""
from __future__ import annotations

import heapq
from collections import OrderedDict

import numpy as np


def _cached_prefix(chain, present) -> int:
    k = 0
    for b in chain:
        if not present(b):
            break
        k += 1
    return k


def infinite_hits(chains: list[np.ndarray]) -> int:
    seen: set[int] = set()
    hits = 0
    for c in chains:
        c = c.tolist()
        hits += _cached_prefix(c, seen.__contains__)
        seen.update(c)
    return hits


def lru_hits(chains: list[np.ndarray], capacity: int) -> int:
    """LRU over blocks. A request touches its chain leaf to root, so among its blocks the root
    is the most recent and the deepest is evicted first (what a prefix cache wants)."""
    cache: OrderedDict[int, None] = OrderedDict()
    hits = 0
    for c in chains:
        c = c.tolist()
        hits += _cached_prefix(c, cache.__contains__)
        for b in reversed(c):
            if b in cache:
                cache.move_to_end(b)
            else:
                cache[b] = None
        while len(cache) > capacity:
            cache.popitem(last=False)
    return hits


def next_uses(chains: list[np.ndarray], n_blocks: int) -> list[np.ndarray]:
    """For each request and chain position: the index of the next request referencing that
    block (len(chains) when none does)."""
    last = np.full(n_blocks, len(chains), dtype=np.int64)
    out: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * len(chains)
    for i in range(len(chains) - 1, -1, -1):
        c = chains[i]
        out[i] = last[c].copy()
        last[c] = i
    return out


def belady_hits(chains: list[np.ndarray], capacity: int, n_blocks: int | None = None) -> int:
    """Belady's MIN with bypass, prefix hits counted (see the module docstring for why this is
    the optimum). ``n_blocks``: one more than the largest block id (computed when omitted)."""
    if n_blocks is None:
        n_blocks = 1 + max((int(c.max()) for c in chains if len(c)), default=-1)
    nxt = next_uses(chains, n_blocks)
    cached = np.zeros(n_blocks, dtype=bool)
    due = np.zeros(n_blocks, dtype=np.int64)   # next use of each cached block
    heap: list[tuple[int, int, int]] = []      # (-next use, -depth, block): farthest on top
    size = hits = 0
    for i, c in enumerate(chains):
        c = c.tolist()
        hits += _cached_prefix(c, cached.__getitem__)
        for depth, (b, nu) in enumerate(zip(c, nxt[i].tolist())):
            if cached[b]:
                due[b] = nu
                heapq.heappush(heap, (-nu, -depth, b))
                continue
            if size >= capacity:
                # drop entries of evicted blocks and superseded next uses
                while heap and (not cached[heap[0][2]] or due[heap[0][2]] != -heap[0][0]):
                    heapq.heappop(heap)
                if not heap or (nu, depth) >= (-heap[0][0], -heap[0][1]):
                    continue            # the incoming block is the farthest: not admitted
                cached[heapq.heappop(heap)[2]] = False
                size -= 1
            cached[b] = True
            due[b] = nu
            heapq.heappush(heap, (-nu, -depth, b))
            size += 1
    return hits
