"""The SSD tier's slot allocator: which slot of which segment holds which block.

Capacity is cut into segments; a segment is handed to one size class (one slot size: a block size
rounded up to 4 KiB) the first time that class needs room, and cut into slots; an emptied segment
can be re-cut for another class (the policy is kvstore.tiers.ssd.space.SSDSpace). A slot address
is ``segment << 32 | slot``. Millions of blocks live in a handful of files: no file per block.

State owned here (on the event loop, except the sequence clock, which the I/O threads take
under its lock): ``segments`` (per segment its slot size, the owner of each slot, the free
list, the sequence number of each slot) and the sequence clock. Nothing here touches a file:
kvstore.tiers.ssd.files opens them, kvstore.tiers.ssd.slotio moves the bytes.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np

from kvstore.tiers.ssd.format import HEADER_BYTES, SLOT_BITS, slots_per_segment

RESERVED = -2        # Segment.owner of a slot the loading index will restore (reserve_slots)
SLOT_MASK = (1 << SLOT_BITS) - 1


@dataclass
class Segment:
    number: int
    fd: int
    slot_bytes: int = 0                        # 0: not yet given to a size class
    owner: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    free: list[int] = field(default_factory=list)
    # Sequence number of the block each slot holds (written in its header; journaled with it).
    seq: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.uint64))


class SlotAllocator:
    """The slots of ``segments`` (appended by the owner of the files), ``segment_bytes`` each.
    A base of kvstore.tiers.ssd.files.SlabFiles: ``_init_allocator`` sets the state it owns."""

    segment_bytes: int

    def _init_allocator(self) -> None:
        self.segments: list[Segment] = []
        self._seq = 0
        self._seq_lock = threading.Lock()

    # -- sequence numbers ----------------------------------------------------------------------
    def next_seq(self) -> int:
        """A number larger than every one handed out or recovered so far (a hybrid clock: wall
        clock ns when it moves forward, last + 1 otherwise)."""
        with self._seq_lock:
            self._seq = max(time.time_ns(), self._seq + 1)
            return self._seq

    def observe_seq(self, seq: int) -> None:
        """Floor the clock at a recovered number (a clock stepped back across a restart)."""
        with self._seq_lock:
            self._seq = max(self._seq, int(seq))

    # -- slots ---------------------------------------------------------------------------------
    def assign_segment(self, number: int, slot_bytes: int) -> bool:
        """Give segment ``number`` to a size class (replay of the journal); False if out of range."""
        if number >= len(self.segments):
            return False
        seg = self.segments[number]
        if seg.slot_bytes == 0:
            n = slots_per_segment(self.segment_bytes, slot_bytes)
            seg.slot_bytes = slot_bytes
            seg.owner = np.full(n, -1, dtype=np.int64)
            seg.seq = np.zeros(n, dtype=np.uint64)
            seg.free = list(range(n - 1, -1, -1))
        return seg.slot_bytes == slot_bytes

    def allocate(self, slot_bytes: int) -> int | None:
        """Address of a free slot of this size in an already assigned segment, or None."""
        for seg in self.segments:
            if seg.slot_bytes == slot_bytes and seg.free:
                return (seg.number << SLOT_BITS) | seg.free.pop()
        return None

    def rebuild_free_lists(self) -> None:
        """After recovery set owners directly: free slots are those without one (lowest first);
        slots reserved for the load (reserve_slots) and never restored become free."""
        for seg in self.segments:
            if seg.slot_bytes:
                seg.owner[seg.owner < 0] = -1
                seg.free = np.flatnonzero(seg.owner < 0)[::-1].tolist()

    def reserve_slots(self, addrs: np.ndarray) -> None:
        """While the index loads: keep these slots (the ones it will restore) off the free
        lists, so a block written meanwhile never lands in a slot a journaled block still
        claims. rebuild_free_lists ends the reservation."""
        addrs = np.asarray(addrs, dtype=np.int64)
        seg_no = addrs >> SLOT_BITS
        for n in np.unique(seg_no).tolist():
            self.segments[n].owner[addrs[seg_no == n] & ((1 << SLOT_BITS) - 1)] = RESERVED
        for seg in self.segments:
            if seg.slot_bytes:
                seg.free = np.flatnonzero(seg.owner == -1)[::-1].tolist()

    def set_owner(self, addr: int, block_id: int) -> None:
        self.segments[addr >> SLOT_BITS].owner[addr & ((1 << SLOT_BITS) - 1)] = block_id

    def set_owners(self, addrs: np.ndarray, block_ids: np.ndarray) -> None:
        """set_owner for many slots at once (recovery)."""
        addrs = np.asarray(addrs, dtype=np.int64)
        seg_no = addrs >> SLOT_BITS
        slot = addrs & ((1 << SLOT_BITS) - 1)
        for n in np.unique(seg_no).tolist():
            mine = seg_no == n
            self.segments[n].owner[slot[mine]] = block_ids[mine]

    def seq_of(self, addrs: np.ndarray) -> np.ndarray:
        """Sequence numbers of the blocks in these slots (as their headers say)."""
        addrs = np.asarray(addrs, dtype=np.int64)
        out = np.zeros(len(addrs), dtype=np.uint64)
        seg_no = addrs >> SLOT_BITS
        # One sort by segment instead of a mask over every address per segment.
        order = np.argsort(seg_no, kind="stable")
        segs, starts = np.unique(seg_no[order], return_index=True)
        for n, a, b in zip(segs.tolist(), starts.tolist(), [*starts[1:].tolist(), len(order)]):
            sel = order[a:b]
            out[sel] = self.segments[n].seq[addrs[sel] & ((1 << SLOT_BITS) - 1)]
        return out

    def set_seq(self, addrs: np.ndarray, seqs: np.ndarray) -> None:
        """Recovery: the sequence numbers of restored blocks (kept for compaction)."""
        addrs = np.asarray(addrs, dtype=np.int64)
        seg_no = addrs >> SLOT_BITS
        for n in np.unique(seg_no).tolist():
            sel = seg_no == n
            self.segments[n].seq[addrs[sel] & ((1 << SLOT_BITS) - 1)] = seqs[sel]
        if len(seqs):
            self.observe_seq(int(np.max(seqs)))

    def free(self, addr: int) -> None:
        seg = self.segments[addr >> SLOT_BITS]
        slot = addr & ((1 << SLOT_BITS) - 1)
        seg.owner[slot] = -1
        seg.free.append(slot)

    def owners(self, slot_bytes: int) -> np.ndarray:
        parts = [s.owner[s.owner >= 0] for s in self.segments if s.slot_bytes == slot_bytes]
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)

    def sample_owners(self, slot_bytes: int, k: int, rng: np.random.Generator) -> np.ndarray:
        """Block ids in up to k distinct slots of this size, drawn at random (all of them when
        the class has at most k slots); free slots omitted."""
        segs = [s for s in self.segments if s.slot_bytes == slot_bytes]
        sizes = np.array([len(s.owner) for s in segs], dtype=np.int64)
        total = int(sizes.sum()) if len(segs) else 0
        if total <= k:
            return self.owners(slot_bytes)
        picks = np.unique(rng.integers(0, total, k))
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        seg_of = np.searchsorted(starts, picks, side="right") - 1
        out = np.empty(len(picks), dtype=np.int64)
        for i, seg in enumerate(segs):
            sel = seg_of == i
            out[sel] = seg.owner[picks[sel] - starts[i]]
        return out[out >= 0]

    def slot_bytes_of(self, addr: int) -> int:
        return self.segments[addr >> SLOT_BITS].slot_bytes

    def used_bytes(self) -> int:
        """Bytes of slots not on a free list, their headers included (the same measure as
        capacity_bytes; cheap: stats sample it every second)."""
        return sum((s.slot_bytes + HEADER_BYTES) * (len(s.owner) - len(s.free))
                   for s in self.segments if s.slot_bytes)
