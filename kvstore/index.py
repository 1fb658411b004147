"""The block index: every block the daemon holds, in any tier.

Blocks get a small integer id; their fields live in numpy columns indexed by that id, so the
per-block cost is a few dozen bytes instead of a Python object each. Keys are looked up through one
dict per namespace, so a key of one namespace can never resolve to a block of another.

Block states: WRITING (allocated, invisible to readers) → COMMITTED (visible) → DELETED
(removed from the key map; its slot is freed once the last lease on it is released).
"""
from __future__ import annotations

import numpy as np

from kvstore.keys import KEY_BYTES

FREE, WRITING, COMMITTED, DELETED = 0, 1, 2, 3
NO_SLOT = -1

_COLUMNS = {
    "ns": np.uint32,
    "state": np.uint8,
    "dram": np.int64,       # arena offset, NO_SLOT if not in DRAM
    "ssd": np.int64,        # SSD slot number, NO_SLOT if not on SSD
    "stamp": np.uint64,     # logical time of the last touch (one tick per request)
    "leases": np.uint32,    # readers holding the block
    "parent": np.int64,     # block id of the previous block in its chain, -1 for a root
    "children": np.uint32,  # blocks whose parent this is (prefix-aware eviction)
    "depth": np.uint32,     # position in its chain
    "csum": np.uint64,      # checksum of the block's bytes on SSD (valid when ssd != NO_SLOT)
}


class BlockIndex:
    def __init__(self, initial_capacity: int = 1024):
        self._cap = 0
        self.keys = np.empty((0, KEY_BYTES), dtype=np.uint8)
        for name, dtype in _COLUMNS.items():
            setattr(self, name, np.empty(0, dtype=dtype))
        self._free_ids: list[int] = []
        self._maps: dict[int, dict[bytes, int]] = {}
        self.clock = 0
        self._grow(initial_capacity)

    # -- time -------------------------------------------------------------------------------
    def tick(self) -> int:
        self.clock += 1
        return self.clock

    # -- lookup -----------------------------------------------------------------------------
    def find(self, ns: int, key: bytes) -> int:
        return self._maps.get(ns, {}).get(key, -1)

    def count(self, ns: int | None = None) -> int:
        if ns is None:
            return sum(len(m) for m in self._maps.values())
        return len(self._maps.get(ns, {}))

    def ids(self, ns: int) -> list[int]:
        return list(self._maps.get(ns, {}).values())

    def key_of(self, bid: int) -> bytes:
        return self.keys[bid].tobytes()

    # -- mutation ---------------------------------------------------------------------------
    def add(self, ns: int, key: bytes, parent: int, stamp: int) -> int:
        if not self._free_ids:
            self._grow(max(1024, self._cap))
        bid = self._free_ids.pop()
        self.keys[bid] = np.frombuffer(key, dtype=np.uint8)
        self.ns[bid] = ns
        self.state[bid] = WRITING
        self.dram[bid] = NO_SLOT
        self.ssd[bid] = NO_SLOT
        self.stamp[bid] = stamp
        self.leases[bid] = 0
        self.parent[bid] = parent
        self.children[bid] = 0
        self.depth[bid] = self.depth[parent] + 1 if parent >= 0 else 0
        if parent >= 0:
            self.children[parent] += 1
        self._maps.setdefault(ns, {})[key] = bid
        return bid

    def unlink(self, bid: int) -> None:
        """Remove the block from its key map (no longer findable); the id stays allocated.

        Parent links only order eviction. A child of an unlinked block keeps its link, so after
        the id is reused it may point at an unrelated block: that can perturb eviction order,
        never which bytes a key resolves to.
        """
        m = self._maps.get(int(self.ns[bid]))
        if m is not None and m.get(self.key_of(bid)) == bid:
            del m[self.key_of(bid)]
        parent = int(self.parent[bid])
        if parent >= 0 and self.children[parent] > 0:
            self.children[parent] -= 1
        self.parent[bid] = -1

    def release_id(self, bid: int) -> None:
        self.state[bid] = FREE
        self.dram[bid] = NO_SLOT
        self.ssd[bid] = NO_SLOT
        self._free_ids.append(bid)

    def _grow(self, extra: int) -> None:
        new_cap = self._cap + extra
        self.keys = np.concatenate([self.keys, np.zeros((extra, KEY_BYTES), dtype=np.uint8)])
        for name, dtype in _COLUMNS.items():
            col = getattr(self, name)
            setattr(self, name, np.concatenate([col, np.zeros(extra, dtype=dtype)]))
        self._free_ids.extend(range(new_cap - 1, self._cap - 1, -1))
        self._cap = new_cap

    def eviction_order(self, candidates: np.ndarray) -> np.ndarray:
        """Candidates sorted most-evictable first.

        Least recently touched first; among blocks touched at the same time (one request's
        chain), leaves before the blocks they hang from, and deeper blocks before shallower:
        roots shared by many prefixes are worth the most.
        """
        if len(candidates) == 0:
            return candidates
        order = np.lexsort((
            -self.depth[candidates].astype(np.int64),
            self.children[candidates] > 0,
            self.stamp[candidates],
        ))
        return candidates[order]
