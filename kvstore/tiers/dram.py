"""The DRAM tier: slot allocation inside the shared arena.

The arena's data region is cut into equal chunks. A chunk (or a run of adjacent chunks, for slots
larger than a chunk) is handed to one *size class* — one slot size, i.e. one block size rounded up
to 4 KiB — and cut into slots of that size. Namespaces with the same block size share a class;
different block sizes never share a chunk, so there is no fragmentation inside a chunk.

When a class has no free slot, the caller evicts inside that class (``slot_owner`` maps each slot
back to its block). A class that owns nothing yet takes a free run of chunks, or reclaims a run
that another class has emptied.

While the daemon is still preparing the arena (kvstore.core.arena.ArenaPreparer), only the chunks
below the prepared prefix exist for the allocator: the others are neither free nor owned until
:meth:`SlabAllocator.mark_ready` says their memory is reserved, so no slot is ever handed out in
unprepared memory. ``capacity_bytes`` stays the configured size, ``ready_bytes`` grows to it.

:class:`DRAMTier` is the tier (kvstore.tiers.base.Tier) around the arena and its allocator, and
the only writer of both and of its counters: it hands out, assigns, frees and quarantines slots,
plans and carries out evictions, and counts. Everyone else asks it (a test,
tests/test_architecture.py, keeps it so). Evicting DRAM means demoting to the tiers below, so
*when* to evict is the store's (kvstore.store.blockstore), which coordinates the tiers: it asks
for the victims (:meth:`DRAMTier.planned_victims`), has the dirty ones written to SSD (awaited,
off the event loop), then has them evicted (:meth:`DRAMTier.make_room`, synchronous, no I/O).
A victim with an SSD copy is demoted (its DRAM copy dropped), one without is dropped.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kvstore.core.arena import HEADER_BYTES
from kvstore.metrics.counters import TierCounters
from kvstore.policies.eviction import EvictionPolicy, PrefixAwareLRU
from kvstore.tiers.base import COMMITTED, NO_SLOT, QUARANTINED

DEFAULT_CHUNK_BYTES = 64 << 20


def arena_geometry(data_bytes: int, chunk_bytes: int) -> tuple[int, int]:
    """(chunk bytes, usable data bytes) of an arena data region of ``data_bytes`` asked with
    chunks of ``chunk_bytes``: chunks are whole pages, at most the region, and the tier uses
    whole chunks only — so the daemon sizes the arena to the usable bytes (what it reserves is
    what the tier can hold) and says so when that is less than asked."""
    chunk = max(4096, min(chunk_bytes, data_bytes) // 4096 * 4096)
    return chunk, data_bytes // chunk * chunk


@dataclass
class Span:
    first_chunk: int
    n_chunks: int
    base: int            # arena offset of its first slot
    n_slots: int
    used: int = 0


@dataclass
class SizeClass:
    slot_bytes: int
    spans: list[Span] = field(default_factory=list)
    free: list[int] = field(default_factory=list)   # free slot offsets (a stack)
    # slot_owner[i] is the block id held in the i-th slot of this class, -1 if free
    slot_owner: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    slot_offsets: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))

    @property
    def n_slots(self) -> int:
        return len(self.slot_offsets)


class SlabAllocator:
    def __init__(self, arena_bytes: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 generations=None, ready_bytes: int | None = None):
        """``generations``: kvstore.core.slotgen.SlotGenerations (None: none kept), bumped whenever a
        slot may get new bytes, so that readers can prove a copy was not torn by reuse.
        ``ready_bytes``: arena offset up to which memory is prepared (None: all of it)."""
        self.generations = generations
        self.chunk_bytes, usable = arena_geometry(arena_bytes - HEADER_BYTES, chunk_bytes)
        self.n_chunks = usable // self.chunk_bytes
        self.chunk_free = np.zeros(self.n_chunks, dtype=bool)
        self.ready_chunks = 0
        self.classes: dict[int, SizeClass] = {}
        self._slot_index: dict[int, tuple[SizeClass, int]] = {}  # offset -> (class, slot no.)
        self.mark_ready(arena_bytes if ready_bytes is None else ready_bytes)

    @property
    def capacity_bytes(self) -> int:
        """The configured capacity (all chunks, prepared or not)."""
        return self.n_chunks * self.chunk_bytes

    @property
    def ready_bytes(self) -> int:
        """Capacity whose memory is prepared: what the allocator can hand out today."""
        return self.ready_chunks * self.chunk_bytes

    def mark_ready(self, reserved_end: int) -> int:
        """Memory below arena offset ``reserved_end`` is prepared: its whole chunks join the
        free pool. Returns the number of chunks that became ready (0 if none)."""
        n = max(0, min(self.n_chunks, (reserved_end - HEADER_BYTES) // self.chunk_bytes))
        if n <= self.ready_chunks:
            return 0
        self.chunk_free[self.ready_chunks:n] = True
        new, self.ready_chunks = n - self.ready_chunks, n
        return new

    def used_bytes(self) -> int:
        return sum(c.slot_bytes * (c.n_slots - len(c.free)) for c in self.classes.values())

    def size_class(self, slot_bytes: int) -> SizeClass:
        cls = self.classes.get(slot_bytes)
        if cls is None:
            if slot_bytes > self.n_chunks * self.chunk_bytes:
                raise ValueError(f"a {slot_bytes}-byte slot does not fit in the DRAM arena")
            cls = self.classes[slot_bytes] = SizeClass(slot_bytes)
        return cls

    def allocate(self, slot_bytes: int) -> int | None:
        """Offset of a free slot of this size, or None (caller evicts, then retries)."""
        cls = self.size_class(slot_bytes)
        if not cls.free and not self.grow(cls):
            return None
        off = cls.free.pop()
        if self.generations is not None:
            self.generations.bump(off)
        return off

    def set_owner(self, offset: int, block_id: int) -> None:
        cls, i = self._slot_index[offset]
        cls.slot_owner[i] = block_id

    def slot_bytes(self, offset: int) -> int:
        """The size of the slot at ``offset`` (a slot this allocator handed out)."""
        return self._slot_index[offset][0].slot_bytes

    def free(self, offset: int) -> None:
        cls, i = self._slot_index[offset]
        cls.slot_owner[i] = -1
        cls.free.append(offset)

    def owners(self, slot_bytes: int) -> np.ndarray:
        """Block ids occupying this class's slots (free slots omitted)."""
        cls = self.classes.get(slot_bytes)
        if cls is None:
            return np.empty(0, dtype=np.int64)
        o = cls.slot_owner
        return o[o >= 0]

    def release_empty_spans(self, keep: SizeClass | None = None) -> int:
        """Give chunks of fully free spans back to the pool; returns chunks released."""
        released = 0
        for cls in self.classes.values():
            if cls is keep:
                continue
            for span in list(cls.spans):
                lo, hi = span.base, span.base + span.n_slots * cls.slot_bytes
                in_span = (cls.slot_offsets >= lo) & (cls.slot_offsets < hi)
                if (cls.slot_owner[in_span] >= 0).any():
                    continue
                keep_mask = ~in_span
                if self.generations is not None:   # the chunks may be cut another way next
                    self.generations.bump_many(cls.slot_offsets[in_span])
                for off in cls.slot_offsets[in_span].tolist():
                    self._slot_index.pop(off, None)
                cls.free = [f for f in cls.free if not lo <= f < hi]
                cls.slot_offsets = cls.slot_offsets[keep_mask]
                cls.slot_owner = cls.slot_owner[keep_mask]
                for j, off in enumerate(cls.slot_offsets.tolist()):
                    self._slot_index[off] = (cls, j)
                cls.spans.remove(span)
                self.chunk_free[span.first_chunk:span.first_chunk + span.n_chunks] = True
                released += span.n_chunks
        return released

    def grow(self, cls: SizeClass) -> bool:
        need = -(-cls.slot_bytes // self.chunk_bytes)
        start = self._find_free_run(need)
        if start is None:
            return False
        self.chunk_free[start:start + need] = False
        base = HEADER_BYTES + start * self.chunk_bytes
        n_slots = (need * self.chunk_bytes) // cls.slot_bytes
        cls.spans.append(Span(start, need, base, n_slots))
        offsets = base + np.arange(n_slots, dtype=np.int64) * cls.slot_bytes
        first = cls.n_slots
        cls.slot_offsets = np.concatenate([cls.slot_offsets, offsets])
        cls.slot_owner = np.concatenate([cls.slot_owner, np.full(n_slots, -1, dtype=np.int64)])
        for j, off in enumerate(offsets.tolist()):
            self._slot_index[off] = (cls, first + j)
        cls.free.extend(reversed(offsets.tolist()))  # lowest offset handed out first
        return True

    def _find_free_run(self, need: int) -> int | None:
        run = 0
        for i, free in enumerate(self.chunk_free.tolist()):
            run = run + 1 if free else 0
            if run == need:
                return i - need + 1
        return None


def make_room(slabs: SlabAllocator, order, slot_bytes: int, n_needed: int, evictable,
              evict) -> None:
    """Make ``n_needed`` slots of this size free: grow into free chunks first, then evict the
    class's least valuable blocks, then other classes' coldest blocks until whole chunks come
    free for this class. ``evictable(slot_bytes)`` names the candidates (block ids) of a class,
    ``order(candidates)`` sorts them most-evictable first (an eviction policy's), and
    ``evict(block_ids)`` frees their slots. Used by the DRAM tier (store) and the HBM tier."""
    cls = slabs.size_class(slot_bytes)
    while len(cls.free) < n_needed and slabs.grow(cls):
        pass
    short = n_needed - len(cls.free)
    if short <= 0:
        return
    evict(order(evictable(slot_bytes))[:short].tolist())
    if len(cls.free) >= n_needed:
        return
    for other in [c for c in slabs.classes.values() if c is not cls]:
        for bid in order(evictable(other.slot_bytes)).tolist():
            evict([bid])
            if slabs.release_empty_spans(keep=cls):
                while len(cls.free) < n_needed and slabs.grow(cls):
                    pass
                if len(cls.free) >= n_needed:
                    return


class DRAMTier:
    """The shared arena as a tier: its allocator, its counters, slot views.

    Owns which arena slot holds which block (its allocator, ``slabs``, is read by others but
    written only here) and its counters; the block's ``dram`` column in the table is set
    through the table. Runs on the daemon's event loop (no locks).

    Slot life cycle, as the store asks it: :meth:`take_slots` (free slots, no eviction) →
    :meth:`assign` (the slot holds this block) → :meth:`free_slot`, or :meth:`quarantine`
    (a writer may still copy into it: never handed out, never evicted) → :meth:`free_quarantined`.
    Room is made by :meth:`make_room` (synchronous eviction, no I/O)."""

    name = "DRAM"

    def __init__(self, arena, table, chunk_bytes: int = DEFAULT_CHUNK_BYTES, generations=None,
                 eviction: EvictionPolicy | None = None):
        """``generations``: kvstore.core.slotgen.SlotGenerations of the arena (None: readers
        confirm their releases). Only the arena's prepared prefix is handed out; the daemon
        marks the rest ready as its ArenaPreparer reserves it (:meth:`mark_ready`).
        ``eviction``: the order DRAM gives blocks up in (kvstore.policies.eviction)."""
        self.arena = arena
        self.table = table
        self.eviction = eviction or PrefixAwareLRU()
        self.generations = generations
        self.slabs = SlabAllocator(arena.size_bytes, chunk_bytes, generations,
                                   ready_bytes=arena.reserved_bytes)
        self.counters = TierCounters()
        self._demoted = 0        # blocks demoted by the eviction under way (make_room, evict)

    @property
    def buffer(self):
        return self.arena.buffer

    @property
    def chunk_bytes(self) -> int:
        return self.slabs.chunk_bytes

    @property
    def ready_bytes(self) -> int:
        return self.slabs.ready_bytes

    def mark_ready(self, reserved_end: int) -> int:
        """The arena is prepared up to ``reserved_end`` (SlabAllocator.mark_ready)."""
        return self.slabs.mark_ready(reserved_end)

    def view(self, offset: int, nbytes: int) -> memoryview:
        return self.arena.buffer[offset:offset + nbytes]

    # -- slots ---------------------------------------------------------------------------------
    def check_slot_bytes(self, slot_bytes: int) -> None:
        """Raise ValueError when a slot of this size cannot exist in the arena."""
        self.slabs.size_class(slot_bytes)

    def slot_bytes(self, offset: int) -> int:
        return self.slabs.slot_bytes(offset)

    def take_slots(self, slot_bytes: int, n: int) -> list[int]:
        """Up to n free slots of this size (no eviction: the caller makes room first), owned by
        no block until :meth:`assign`."""
        out: list[int] = []
        while len(out) < n:
            off = self.slabs.allocate(slot_bytes)
            if off is None:
                break
            out.append(off)
        return out

    def assign(self, offset: int, bid: int) -> None:
        """Slot ``offset`` (from take_slots) holds block ``bid`` (an eviction candidate once the
        table says it is committed, unleased and in DRAM)."""
        self.slabs.set_owner(offset, bid)

    def slots_for(self, bids: list[int], sizes: list[int]) -> list[int | None]:
        """A free slot of ``sizes[i]`` bytes for each block, assigned to it; None from the first
        block that finds none (no eviction: the caller made room)."""
        out: list[int | None] = []
        for bid, sb in zip(bids, sizes):
            off = self.slabs.allocate(sb) if not out or out[-1] is not None else None
            if off is not None:
                self.slabs.set_owner(off, bid)
            out.append(off)
        return out

    def free_slot(self, offset: int) -> None:
        """Slot ``offset`` holds nothing any more (an aborted write, a failed promotion)."""
        self.slabs.free(offset)

    def quarantine(self, offset: int) -> int:
        """Hold slot ``offset`` back from reuse (a writer may still copy into it); returns its
        bytes. Freed by :meth:`free_quarantined` only."""
        self.slabs.set_owner(offset, QUARANTINED)
        return self.slabs.slot_bytes(offset)

    def free_quarantined(self, offsets: list[int]) -> int:
        """Free these quarantined slots; returns their bytes."""
        freed = 0
        for off in offsets:
            freed += self.slabs.slot_bytes(off)
            self.slabs.free(off)
        return freed

    # -- eviction --------------------------------------------------------------------------------
    def evictable(self, slot_bytes: int) -> np.ndarray:
        """Block ids of this size class that DRAM eviction may take: committed, unpinned, and
        with their DRAM copy in place (dram == NO_SLOT: a slot a promotion is filling)."""
        t = self.table
        owners = self.slabs.owners(slot_bytes)
        mask = (t.state[owners] == COMMITTED) & (t.leases[owners] == 0) & \
            (t.dram[owners] != NO_SLOT)
        return owners[mask]

    def eviction_order(self, candidates: np.ndarray) -> np.ndarray:
        return self.eviction.order(self.table, candidates)

    def planned_victims(self, slot_bytes: int, n_needed: int) -> np.ndarray:
        """The blocks of this size class make_room would evict first to free ``n_needed``
        slots now (free slots and free chunks count first), without evicting anything. It does
        not foresee evictions from other size classes (make_room's last resort)."""
        chunk_slots = self.slabs.chunk_bytes // slot_bytes if slot_bytes <= \
            self.slabs.chunk_bytes else 0
        cls = self.slabs.classes.get(slot_bytes)
        free = (len(cls.free) if cls is not None else 0) + \
            int(self.slabs.chunk_free.sum()) * chunk_slots
        short = n_needed - free
        if short <= 0:
            return np.empty(0, dtype=np.int64)
        return self.eviction_order(self.evictable(slot_bytes))[:short]

    def make_room(self, slot_bytes: int, n_needed: int, keep_dirty: bool = False) -> int:
        """Evict least valuable unleased blocks until ``n_needed`` slots of this size are free
        (or nothing more can go). Synchronous and without I/O: a victim with an SSD copy is
        demoted (its DRAM copy dropped), one without is dropped — unless ``keep_dirty`` (a
        write-back SSD tier: dirty blocks are written before they may go, see the store's
        eviction plan), when blocks without an SSD copy are not candidates at all. Returns the
        number of blocks demoted."""
        self._demoted = 0
        if keep_dirty:
            ssd = self.table.ssd

            def candidates(sb: int) -> np.ndarray:
                c = self.evictable(sb)
                return c[ssd[c] != NO_SLOT]
        else:
            candidates = self.evictable
        make_room(self.slabs, self.eviction_order, slot_bytes, n_needed, candidates,
                  self._evict)
        return self._demoted

    def evict(self, victims: list[int]) -> int:
        """Evict these blocks now (demoted where they have an SSD copy, else dropped); returns
        the number demoted."""
        self._demoted = 0
        self._evict(victims)
        return self._demoted

    def _evict(self, victims: list[int]) -> None:
        table = self.table
        ids = np.asarray(victims, dtype=np.int64)
        on_ssd = table.ssd[ids] != NO_SLOT
        demoted = ids[on_ssd]
        if len(demoted):
            for off in table.dram[demoted].tolist():
                self.slabs.free(off)
            table.set_dram_many(demoted, np.full(len(demoted), NO_SLOT, dtype=np.int64))
            self._demoted += len(demoted)
            self.counters.demotions += len(demoted)
        for bid in ids[~on_ssd].tolist():
            table.free(bid)           # the table's on_free frees the slot (forget)
        self.counters.evictions += len(victims)

    def headroom(self):
        """(slot bytes, slots free or growable now, evictable block ids) per size class: what
        the write-back cleaner keeps clean ahead of eviction."""
        free_chunk_bytes = int(self.slabs.chunk_free.sum()) * self.slabs.chunk_bytes
        for cls in list(self.slabs.classes.values()):
            yield (cls.slot_bytes, len(cls.free) + free_chunk_bytes // cls.slot_bytes,
                   self.evictable(cls.slot_bytes))

    def promoted(self, bids: list[int], offsets: list[int]) -> None:
        """A promotion filled these slots with their blocks' bytes: they are the DRAM copies
        now."""
        self.table.set_dram_many(np.asarray(bids, dtype=np.int64),
                                 np.asarray(offsets, dtype=np.int64))
        self.counters.promotions += len(bids)

    def promotion_slots(self) -> "PromotionSlots":
        """The narrow view of this tier a reading tier (SSD) is handed for one promotion."""
        return PromotionSlots(self)

    # -- counting ------------------------------------------------------------------------------
    def count_get(self, hits: int, misses: int, bytes_out: int) -> None:
        """One get: blocks served from DRAM, blocks asked for and not served there, bytes."""
        self.counters.count_get(hits, misses, bytes_out)

    def count_put(self, nbytes: int) -> None:
        """Bytes committed into DRAM slots (the store fills DRAM for its clients)."""
        self.counters.bytes_in += nbytes

    def uncount_reads(self, nbytes: int) -> None:
        """Bytes a get counted (count_get) and did not serve after all (a promotion fell short)."""
        self.counters.bytes_out -= nbytes

    # -- kvstore.tiers.base.Tier ------------------------------------------------------------------
    def capacity_bytes(self) -> int:
        return self.slabs.capacity_bytes

    def used_bytes(self) -> int:
        return self.slabs.used_bytes()

    def blocks(self) -> int:
        t = self.table
        return int(np.count_nonzero((t.state == COMMITTED) & (t.dram != NO_SLOT)))

    def forget(self, bid: int) -> None:
        off = int(self.table.dram[bid])
        if off != NO_SLOT:
            self.slabs.free(off)

    def stats_row(self):
        from kvstore.v1 import kvstore_pb2 as pb
        return slab_stats_row(pb.TIER_DRAM, self.slabs, self.blocks(), self.counters)


class PromotionSlots:
    """The DRAM slots one promotion reads blocks into, as the tier that reads them (SSD) is
    handed them — never the allocator. :meth:`take` hands out free slots (no eviction: the
    caller made room before), each assigned to its block; the reader then reports every slot
    it took either :meth:`filled` (its bytes are the block's DRAM copy now) or :meth:`unused`
    (the read failed or was not made: the DRAM tier takes the slot back and frees it)."""

    def __init__(self, dram: DRAMTier):
        self._dram = dram

    def take(self, bids: list[int]) -> list[int | None]:
        """A slot for each block, None from the first that finds no free one."""
        layouts = self._dram.table.layouts_of(np.asarray(bids, dtype=np.int64))
        return self._dram.slots_for(bids, [lay.slot_bytes for lay in layouts])

    def view(self, offset: int, nbytes: int) -> memoryview:
        return self._dram.view(offset, nbytes)

    def filled(self, bids: list[int], offsets: list[int]) -> None:
        self._dram.promoted(bids, offsets)

    def unused(self, offset: int) -> None:
        self._dram.free_slot(offset)


def slab_stats_row(tier: int, slabs: SlabAllocator, blocks: int, c: TierCounters):
    """The stats row of a tier whose slots are slabs (DRAM, HBM)."""
    from kvstore.v1 import kvstore_pb2 as pb
    return pb.TierStats(
        tier=tier, capacity_bytes=slabs.capacity_bytes, ready_bytes=slabs.ready_bytes,
        used_bytes=slabs.used_bytes(), blocks=blocks, hits=c.hits, misses=c.misses,
        evictions=c.evictions, bytes_in=c.bytes_in, bytes_out=c.bytes_out,
        promotions=c.promotions, demotions=c.demotions)
