"""The SSD tier's space manager: slots for new writes, eviction, segments moving between block
sizes.

    take_slots(size, n)   free slots of a size: from its segments, a fresh segment, or by
                          making room — evicting the class's least valuable unpinned blocks,
                          or emptying a colder segment of another size and re-cutting it.
    forget(bid)           free a block's SSD slot and journal that.

Built with the block table (block state, eviction order), the slab files and the catalog (which
journals what the space manager changes). An SSD-only victim is dropped through the table
(``discard``), which frees its copies in every tier; a victim with a DRAM copy keeps it.
"""
from __future__ import annotations

import logging

import numpy as np

from kvstore.policies.eviction import EvictionPolicy, PrefixAwareLRU
from kvstore.tiers.base import COMMITTED, NO_SLOT
from kvstore.tiers.ssd.format import slots_per_segment

log = logging.getLogger("kvstore.tiers.ssd.tier")

_SSD_EVICT_BATCH = 64


class SSDSpace:
    def __init__(self, table, files, catalog, rng: np.random.Generator | None = None,
                 eviction: EvictionPolicy | None = None):
        """``eviction``: the order SSD gives blocks up in (kvstore.policies.eviction), applied
        to a random sample of a size class's slots."""
        self.table = table
        self.eviction = eviction or PrefixAwareLRU()
        self.slabs = files
        self.catalog = catalog
        self._rng = rng if rng is not None else np.random.default_rng()
        self.evictions = 0       # SSD blocks evicted (dropped, or kept in DRAM only)

    # -- SSD slots -----------------------------------------------------------------------------
    def take_slots(self, slot_bytes: int, n: int, make_room: bool = True) -> list[int]:
        """Up to n free SSD slots of this size, evicting SSD blocks (prefix-aware) if needed;
        ``make_room`` False: free slots and unassigned segments only (while the index loads,
        when eviction cannot see the blocks not restored yet)."""
        out: list[int] = []
        while len(out) < n:
            addr = self.slabs.allocate(slot_bytes)
            if addr is not None:
                out.append(addr)
                continue
            seg = self.slabs.take_segment(slot_bytes)
            if seg is not None:
                self.catalog.log_segment(seg, slot_bytes)
                continue
            if not make_room or not self._make_room(slot_bytes, n - len(out)):
                break
        return out

    def _make_room(self, slot_bytes: int, need: int) -> int:
        """Free SSD slots of this size: evict the class's least valuable unpinned blocks — or,
        when a segment of another block size is colder than all of those (or the class has
        nothing to evict: a new model on a full tier), empty that segment and give it to this
        class. Returns slots freed (0: nothing could be)."""
        idx = self.table
        batch = max(need, _SSD_EVICT_BATCH)
        # Candidates are a random sample of the class's slots, not all of them: with tens of
        # millions of slots a full sort per eviction would stall the daemon for seconds. Taking
        # the most evictable 1/32 of the sample approximates LRU (with prefix-aware ties).
        owners = self.slabs.sample_owners(slot_bytes, 32 * batch, self._rng)
        owners = owners[(idx.state[owners] == COMMITTED) & (idx.leases[owners] == 0)]
        victims = self.eviction.order(idx, owners)[:batch]
        cold = self._coldest_foreign_segment(slot_bytes)
        if cold is not None and (not len(victims) or cold[1] < int(idx.stamp[victims].max())):
            freed = self._reassign_segment(cold[0], slot_bytes)
            if freed:
                return freed
        for bid in victims.tolist():
            self._evict_block(bid)
        self.evictions += len(victims)
        return len(victims)

    def _evict_block(self, bid: int) -> None:
        if self.table.dram[bid] != NO_SLOT:
            self.forget(bid)            # the DRAM copy stays
        else:
            self.table.discard(bid)     # SSD eviction drops (the table frees every copy)

    def _coldest_foreign_segment(self, slot_bytes: int) -> tuple[int, int] | None:
        """(segment, newest stamp seen in a sample of it) of the coldest segment of another
        size class that could hold this one's slots; -1 for an empty one. None if none."""
        if not slots_per_segment(self.slabs.segment_bytes, slot_bytes):
            return None
        stamp = self.table.stamp
        best = None
        for seg in self.slabs.segments:
            if seg.slot_bytes in (0, slot_bytes):
                continue
            sample = seg.owner if len(seg.owner) <= 256 else \
                seg.owner[self._rng.integers(0, len(seg.owner), 256)]
            sample = sample[sample >= 0]
            newest = int(stamp[sample].max()) if len(sample) else -1
            if best is None or newest < best[1]:
                best = (seg.number, newest)
        return best

    def _reassign_segment(self, number: int, slot_bytes: int) -> int:
        """Empty segment ``number`` (its blocks evicted: dropped, or kept in DRAM) and give it
        to this size class; journaled, so a restart sees the new size. 0 if a block in it is
        pinned (I/O or a lease): then nothing is touched."""
        idx, seg = self.table, self.slabs.segments[number]
        held = seg.owner[seg.owner >= 0]
        if len(held) and ((idx.leases[held] > 0).any() or (idx.state[held] != COMMITTED).any()):
            return 0
        for bid in held.tolist():
            self._evict_block(bid)
        self.evictions += len(held)
        old = seg.slot_bytes
        self.slabs.reassign_segment(number, slot_bytes)
        self.catalog.log_segment(number, slot_bytes, sync=True)
        log.info("SSD segment %d: %d blocks of %d bytes evicted, segment given to %d-byte blocks",
                 number, len(held), old, slot_bytes)
        return len(seg.free)

    def forget(self, bid: int) -> None:
        """Free the block's SSD slot (it must not have I/O in flight) and journal that."""
        addr = self.table.clear_ssd(bid)
        if addr == NO_SLOT:
            return
        self.slabs.free(addr)
        self.catalog.log_delete(addr)
