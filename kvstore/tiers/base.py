"""What every tier is, and the vocabulary of the block table that tiers are handed.

A *tier* is a medium that holds copies of committed blocks: DRAM (the shared arena), SSD (slab
files), HBM (a GPU pool) and the remote (cluster) tier. The store (kvstore.store) owns the block
table and coordinates the tiers; a tier never imports the store. Each tier is built by the
daemon's composition root (kvstore.daemon.server) with the collaborators it needs — the block
table, the DRAM tier whose slots it reads into — and nothing reaches into another's state.

The contract every tier implements (:class:`Tier`):

    name              "HBM", "DRAM", "SSD" or "REMOTE" (the wire's tier names)
    capacity_bytes()  bytes the tier may hold (0: not bounded by this daemon)
    used_bytes()      bytes its slots hold now
    blocks()          blocks with a copy in this tier
    forget(bid)       the block is gone from the store: free this tier's copy (no I/O in flight
                      on it: the table calls this only for unpinned blocks)
    stats_row()       its kvstore.v1.TierStats row (capacity, use, counters)

Block states (the table's ``state`` column): FREE → WRITING (allocated, invisible) → COMMITTED
(visible) → DELETED (unlinked; freed once its last pin goes). NO_SLOT marks "no copy here" in the
``dram`` and ``ssd`` columns.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

FREE, WRITING, COMMITTED, DELETED = 0, 1, 2, 3
NO_SLOT = -1
# A slot owner (DRAM or HBM slab) that is no block: held back from reuse because a writer may
# still copy into it (kvstore.store.writers). Never evicted, never handed out, not a free slot.
QUARANTINED = -3


@runtime_checkable
class Tier(Protocol):
    name: str

    def capacity_bytes(self) -> int: ...

    def used_bytes(self) -> int: ...

    def blocks(self) -> int: ...

    def forget(self, bid: int) -> None: ...

    def stats_row(self): ...
