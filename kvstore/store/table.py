"""The block table: the one owner of block state, every block the daemon holds in any tier.

Blocks get a small integer id; their fields live in numpy columns indexed by that id, and keys
are found through one open-addressing hash table (numpy int32 ids, linear probing) keyed by
(namespace, key): no Python object per block, so ten million blocks cost well under 100 bytes
each (see ``kvstore bench ssd``). A key of one namespace never resolves to a block of another:
a probe matches only if namespace and all 16 key bytes are equal. Keys are BLAKE2b digests, so
their first 8 bytes are already a uniform hash.

Ownership: the columns (``state``, ``dram``, ``ssd``, ``leases``, ``stamp``, ``hits``,
``parent``/``children``/``depth``, ``csum``) are *written only by this class's methods* — add,
publish, set_dram, set_ssd/clear_ssd, pin/unpin (leases and in-flight I/O), touch/count_hits,
discard, free, restore_many. Other modules read them directly (``table.state[bids]``) where a hot
path needs numpy speed: treat the columns as read-only views outside this module. The table also
holds the namespace registry by index (``namespace_of(bid)``), so a tier can learn a block's
layout without the store.

Block states (kvstore.tiers.base): WRITING (allocated, invisible to readers) → COMMITTED
(visible) → DELETED (removed from the key table; freed once the last pin on it is released).
Freeing a block frees its copy in every tier: the table calls ``on_free(bid)`` (given at
construction by the composition root: every tier's ``forget``) and then recycles the id.

What lookups see is mirrored into an optional kvstore.core.shmindex.ShmIndex (same-host clients probe
it without an RPC). The mirror is kept here, in the table's state-change methods — publish
(→ COMMITTED), set_dram (a committed block's tier or slot changes) and unlink (no longer
visible). With the arena's slot generations (kvstore.core.slotgen.SlotGenerations, given at
construction) each mirrored DRAM block also carries its slot offset and the slot's generation
as of the mirror write, which lets same-host clients read it without a lease. Both methods are
called only once the slot holds the block's whole bytes (commit after the writer's copy, a
promotion after its read and checksum), so a published (offset, generation) always names a
complete block; the generation changes only when the slot gets a new owner.

Tier changes of visible blocks are reported to an optional kvstore.events.log.EventLog (given at
construction), from the same methods: a block becomes readable in DRAM (publish, set_dram) or on
SSD (publish, set_ssd, restore_many), or stops being readable there (set_dram(NO_SLOT),
clear_ssd, unlink of a COMMITTED block: every tier it was in). Only COMMITTED blocks are
reported, each change once: a block being freed reports its removal when it is unlinked, not
again when its tiers forget it. A tier that keeps its own copies (HBM) reports them through
``report_copy``.
"""
from __future__ import annotations

import struct

import numpy as np

from kvstore.core.keys import KEY_BYTES
from kvstore.core.shmindex import DRAM, HBM, NO_OFFSET, SSD, ns_tag
from kvstore.events.log import STORED, Record
from kvstore.events.media import MEDIUM_CPU, MEDIUM_GPU, MEDIUM_STORAGE
from kvstore.tiers.base import COMMITTED, DELETED, FREE, NO_SLOT, WRITING

__all__ = ["BlockTable", "COMMITTED", "DELETED", "FREE", "NO_SLOT", "WRITING", "keys_array"]
_EMPTY, _TOMB = -1, -2
_NS_MIX_INT = 0x9E3779B97F4A7C15
_NS_MIX = np.uint64(_NS_MIX_INT)
_U64 = (1 << 64) - 1
_WORDS = struct.Struct("<QQ")
_SCALAR_FIND_MAX = 48      # below this many keys a Python probe beats numpy's call overhead

_COLUMNS = {
    "ns": np.uint32,
    "state": np.uint8,
    "dram": np.int64,       # arena offset, NO_SLOT if not in DRAM
    "ssd": np.int64,        # SSD slot address, NO_SLOT if not on SSD
    "stamp": np.uint64,     # logical time of the last touch (one tick per request)
    "leases": np.uint32,    # readers holding the block (and in-flight I/O pins)
    "parent": np.int32,     # block id of the previous block in its chain, -1 for a root
    "children": np.uint32,  # blocks whose parent this is (prefix-aware eviction)
    "depth": np.uint32,     # position in its chain
    "csum": np.uint64,      # checksum of the block's bytes on SSD (valid when ssd != NO_SLOT)
    "hits": np.uint8,       # gets that leased the block (saturating): selective SSD writes
    "gpu": np.uint8,        # 1 while the HBM tier holds a ready copy (report_copy)
}


def keys_array(keys) -> np.ndarray:
    """[n, 2] uint64 view of 16-byte keys (a list of bytes or one concatenated blob)."""
    blob = keys if isinstance(keys, (bytes, bytearray, memoryview)) else b"".join(keys)
    return np.frombuffer(blob, dtype=np.uint64).reshape(-1, 2)


_REBUILD_BATCH = 4096     # publishing more blocks at once rewrites the mirror (vectorized)
_MIRROR_BATCH_MIN = 16     # blocks from which one ShmIndex.put_many beats a put each


class BlockTable:
    def __init__(self, initial_capacity: int = 1024, mirror=None, on_free=None,
                 generations=None, events=None):
        """``events``: a kvstore.events.log.EventLog told of every tier change (None: none).
        ``on_free(bid)``: frees the block's copies in every tier when it is freed (None: no
        tier keeps per-block state, as in a bare table). ``generations``: the arena's
        kvstore.core.slotgen.SlotGenerations (read only here), so the mirror publishes DRAM
        slots for lease-free reads (None: it publishes tiers only)."""
        self._mirror = mirror          # kvstore.core.shmindex.ShmIndex or None
        self._generations = generations
        self._on_free = on_free
        self._events = events
        self._freeing = -1            # the block whose tiers are forgetting it (free)
        self._namespaces: list = []    # namespace objects by index (kvstore.store.Namespace)
        self._ns_tags: list[int] = []  # mirror tag of each namespace index
        self._cap = 0
        self.keys = np.empty((0, 2), dtype=np.uint64)   # 16 key bytes as two words
        for name, dtype in _COLUMNS.items():
            setattr(self, name, np.empty(0, dtype=dtype))
        self._free = np.empty(0, dtype=np.int32)         # stack of free ids
        self._n_free = 0
        self._table = np.full(16, _EMPTY, dtype=np.int32)
        self._table_used = 0                              # live + tombstones
        self._ns_count: dict[int, int] = {}
        self.clock = 0
        self._grow(max(16, initial_capacity))

    # -- time -------------------------------------------------------------------------------
    def tick(self) -> int:
        self.clock += 1
        return self.clock

    # -- lookup -----------------------------------------------------------------------------
    def _home(self, ns, lo: np.ndarray) -> np.ndarray:
        mask = np.uint64(len(self._table) - 1)
        mixed = lo ^ (np.asarray(ns, dtype=np.uint64) * _NS_MIX)
        return (mixed & mask).astype(np.int64)

    def find_many(self, ns: int, keys) -> np.ndarray:
        """Block id of each key (int64, -1 where absent), probing all keys at once."""
        q = keys_array(keys)
        n = len(q)
        if n <= _SCALAR_FIND_MAX:
            return np.array([self._find_one(ns, lo, hi) for lo, hi in q.tolist()],
                            dtype=np.int64)
        out = np.full(n, -1, dtype=np.int64)
        pos = self._home(ns, q[:, 0])
        active = np.arange(n)
        mask = len(self._table) - 1
        while len(active):
            if len(active) <= _SCALAR_FIND_MAX:   # the long-probe tail: finish it in Python
                for i, (lo, hi) in zip(active.tolist(), q[active].tolist()):
                    out[i] = self._find_one(ns, lo, hi)
                break
            b = self._table[pos].astype(np.int64)
            live = b >= 0
            bl = np.where(live, b, 0)
            hit = live & (self.keys[bl, 0] == q[active, 0]) & (self.keys[bl, 1] == q[active, 1]) \
                & (self.ns[bl] == ns)
            out[active[hit]] = b[hit]
            go_on = ~hit & (b != _EMPTY)
            active, pos = active[go_on], (pos[go_on] + 1) & mask
        return out

    def _find_one(self, ns: int, lo: int, hi: int) -> int:
        """Scalar probe: small batches pay less than numpy's per-call overhead this way."""
        table, keys, nscol = self._table, self.keys, self.ns
        mask = len(table) - 1
        pos = (lo ^ ((ns * _NS_MIX_INT) & _U64)) & mask
        while True:
            b = int(table[pos])
            if b == _EMPTY:
                return -1
            if b >= 0 and int(keys[b, 0]) == lo and int(keys[b, 1]) == hi and int(nscol[b]) == ns:
                return b
            pos = (pos + 1) & mask

    def find(self, ns: int, key: bytes) -> int:
        lo, hi = _WORDS.unpack(key)
        return self._find_one(ns, lo, hi)

    def count(self, ns: int | None = None) -> int:
        if ns is None:
            return sum(self._ns_count.values())
        return self._ns_count.get(ns, 0)

    def key_of(self, bid: int) -> bytes:
        return self.keys[bid].tobytes()

    # -- namespaces ---------------------------------------------------------------------------
    def add_namespace(self, ns) -> None:
        """Register a namespace (a kvstore.store.blockstore.Namespace whose ``index`` is the
        next free one), before any of its blocks; the mirror learns its tag."""
        if ns.index != len(self._namespaces):
            raise ValueError(f"namespace index {ns.index}, expected {len(self._namespaces)}")
        self._namespaces.append(ns)
        if self._events is not None:
            self._events.on_namespace(ns)
        if self._mirror is not None:
            self._ns_tags.append(ns_tag(ns.namespace_id))

    def namespace_of(self, bid: int):
        return self._namespaces[int(self.ns[bid])]

    def layouts_of(self, bids) -> list:
        """The layout of each block's namespace (int64 ids; one lookup when they share one)."""
        ns = self.ns[bids]
        if len(ns) and (ns == ns[0]).all():
            return [self._namespaces[int(ns[0])].layout] * len(ns)
        return [self._namespaces[i].layout for i in ns.tolist()]

    def keys_of(self, bids) -> list[bytes]:
        """key_of for each block (int64 ids)."""
        raw = self.keys[bids].tobytes()
        return [raw[i:i + KEY_BYTES] for i in range(0, len(raw), KEY_BYTES)]

    def namespaces(self) -> tuple:
        """Every registered namespace, by index."""
        return tuple(self._namespaces)

    # -- the prefix walk ------------------------------------------------------------------------
    def committed_prefix(self, ns: int, keys) -> np.ndarray:
        """Block ids (int64) of the longest prefix of ``keys`` whose blocks are COMMITTED: the
        one walk behind lookup, acquire, prefetch, the planner and the remote tier."""
        bids = self.find_many(ns, keys)
        if len(bids) <= _SCALAR_FIND_MAX:     # a Python walk beats numpy's call overhead
            state, n = self.state, 0
            for b in bids.tolist():
                if b < 0 or state[b] != COMMITTED:
                    break
                n += 1
            return bids[:n]
        ok = bids >= 0
        ok[ok] = self.state[bids[ok]] == COMMITTED
        n = len(ok) if ok.all() else int(np.argmin(ok))
        return bids[:n]

    # -- visibility (mirrored) ---------------------------------------------------------------
    def publish(self, bids) -> None:
        """Make WRITING blocks COMMITTED (visible to lookups)."""
        bids = np.asarray(bids, dtype=np.int64)
        self.state[bids] = COMMITTED
        if self._events is not None and len(bids):
            self._report_stored(bids)
        m = self._mirror
        if m is None or not len(bids):
            return
        if len(bids) > _REBUILD_BATCH:
            self.resync_mirror()
            return
        self._mirror_put_many(bids)

    def set_dram(self, bid: int, offset: int) -> None:
        """Set (or clear, NO_SLOT) a block's DRAM slot: a promotion or a demotion."""
        if self._events is not None and self.state[bid] == COMMITTED and bid != self._freeing \
                and (offset == NO_SLOT) != (self.dram[bid] == NO_SLOT):
            self._report(offset != NO_SLOT, MEDIUM_CPU, bid)
        self.dram[bid] = offset
        if self._mirror is not None and self.state[bid] == COMMITTED:
            self._mirror_put(bid)

    def set_dram_many(self, bids: np.ndarray, offsets: np.ndarray) -> None:
        """set_dram for distinct blocks at once (a promotion's blocks, a demotion's victims):
        the same columns, events and mirror as one call per block, in numpy calls per batch."""
        bids = np.asarray(bids, dtype=np.int64)
        offsets = np.asarray(offsets, dtype=np.int64)
        if not len(bids):
            return
        committed = self.state[bids] == COMMITTED
        if self._events is not None:
            now_in = offsets != NO_SLOT
            changed = committed & (now_in != (self.dram[bids] != NO_SLOT)) & \
                (bids != self._freeing)
            stored, removed = bids[changed & now_in], bids[changed & ~now_in]
            if len(stored):
                self._report_stored_in(MEDIUM_CPU, stored)
            if len(removed):
                self._events.removed(MEDIUM_CPU, self.ns[removed], self.keys[removed])
        self.dram[bids] = offsets
        if self._mirror is not None:
            self._mirror_put_many(bids[committed])

    def set_ssd(self, bid: int, addr: int, csum: int) -> None:
        """A block's bytes are now on SSD at ``addr`` with this checksum."""
        if self._events is not None and self.state[bid] == COMMITTED \
                and self.ssd[bid] == NO_SLOT:
            self._report(True, MEDIUM_STORAGE, bid)
        self.ssd[bid] = addr
        self.csum[bid] = csum

    def clear_ssd(self, bid: int) -> int:
        """Forget a block's SSD copy; returns the address it had (NO_SLOT if none)."""
        addr = int(self.ssd[bid])
        if self._events is not None and addr != NO_SLOT and self.state[bid] == COMMITTED \
                and bid != self._freeing:
            self._report(False, MEDIUM_STORAGE, bid)
        self.ssd[bid] = NO_SLOT
        return addr

    # -- touches, leases and pins --------------------------------------------------------------
    def touch(self, bids, stamp: int) -> None:
        """Mark blocks used at logical time ``stamp`` (eviction order)."""
        self.stamp[bids] = stamp

    def count_reads(self, bids: np.ndarray, stamp: int, repeats: bool = False) -> None:
        """A get read these blocks: touched, their hit counts raised (saturating: selective
        SSD and remote writes read it). What a lease-free read reports; a lease adds a pin.
        ``repeats``: a block named n times was read n times (reports of several gets
        coalesced into one call), not once as within one get's batch."""
        self.stamp[bids] = stamp
        if repeats and len(bids) > 1:
            ids, n = np.unique(bids, return_counts=True)
            self.hits[ids] = np.minimum(self.hits[ids].astype(np.int64) + n, 255)
        else:
            self.hits[bids] = np.minimum(self.hits[bids], 254) + 1

    def lease(self, bids: np.ndarray, stamp: int) -> None:
        """A get leased these blocks: counted as read (count_reads) and pinned."""
        self.count_reads(bids, stamp)
        np.add.at(self.leases, bids, 1)      # a batch may name one block twice: pin it twice

    def pin(self, bids) -> None:
        """Protect blocks from eviction, deletion and slot reuse (a lease, I/O in flight, a
        pending prefetch). Every pin is undone by exactly one :meth:`unpin`."""
        if len(bids):
            np.add.at(self.leases, np.asarray(bids, dtype=np.int64), 1)

    def unpin(self, bids) -> None:
        """Undo pins; a DELETED block whose last pin goes is freed (every tier's copy)."""
        if not len(bids):
            return
        ids = np.asarray(bids, dtype=np.int64)
        np.subtract.at(self.leases, ids, 1)
        gone = ids[(self.leases[ids] == 0) & (self.state[ids] == DELETED)]
        if len(gone):
            for bid in np.unique(gone).tolist():
                self.free(bid)

    # -- removal ---------------------------------------------------------------------------------
    def discard(self, bid: int) -> bool:
        """Make a COMMITTED block invisible now (delete, checksum failure, SSD eviction); it is
        freed at once, or when its last pin goes. False if it was not COMMITTED."""
        if self.state[bid] != COMMITTED:
            return False
        self.unlink(bid)
        if self.leases[bid]:
            self.state[bid] = DELETED
        else:
            self.free(bid)
        return True

    def free(self, bid: int) -> None:
        """Forget an unpinned block: unlink it (if still linked), free its copy in every tier
        (``on_free``), recycle its id."""
        if self.state[bid] != DELETED:
            self.unlink(bid)
        if self._on_free is not None:
            self._freeing = bid       # its removal was reported when it was unlinked
            try:
                self._on_free(bid)
            finally:
                self._freeing = -1
        self.release_id(bid)

    def drop_writing(self, bid: int) -> int:
        """Forget a WRITING block (an aborted or expired allocation); returns its DRAM offset,
        whose slot the caller frees or quarantines."""
        off = int(self.dram[bid])
        self.unlink(bid)
        self.release_id(bid)
        return off

    # -- events ---------------------------------------------------------------------------------
    def _report(self, stored: bool, medium: str, bid: int) -> None:
        """One block's change in one tier, with its key (and parent key) copied now. Scalar
        code: this runs once per block on the put, demotion and eviction paths."""
        ns = int(self.ns[bid])
        key = self.keys[bid].tobytes()
        if not stored:
            self._events.removed_one(medium, ns, key)
            return
        p = int(self.parent[bid])
        parent = self.keys[p].tobytes() if p >= 0 and self.state[p] != FREE \
            and int(self.ns[p]) == ns else None
        self._events.stored_one(medium, ns, key, parent)

    def report_copy(self, medium: str, bid: int, stored: bool) -> None:
        """A tier that keeps its own copies (HBM) gained or lost a ready copy of a block. Its
        owner reports both directions, once each, so the stream stays symmetric; the mirror
        then publishes the block's tier as HBM while the copy is there (what lookups answer)."""
        if self._events is not None:
            self._report(stored, medium, bid)
        self.gpu[bid] = stored
        if self._mirror is not None and self.state[bid] == COMMITTED and bid != self._freeing:
            self._mirror_put(bid)     # (a block being freed left the mirror when unlinked)

    def _report_stored(self, bids: np.ndarray, dram: bool = True) -> None:
        """Newly visible blocks: stored in each tier that holds them."""
        if dram:
            in_dram = bids[self.dram[bids] != NO_SLOT]
            if len(in_dram):
                self._report_stored_in(MEDIUM_CPU, in_dram)
        on_ssd = bids[self.ssd[bids] != NO_SLOT]
        if len(on_ssd):
            self._report_stored_in(MEDIUM_STORAGE, on_ssd)

    def _report_stored_in(self, medium: str, bids: np.ndarray) -> None:
        ns = self.ns[bids]
        parent = self.parent[bids].astype(np.int64)
        has = parent >= 0
        p = np.where(has, parent, 0)
        has &= (self.state[p] != FREE) & (self.ns[p] == ns)
        self._events.stored(medium, ns, self.keys[bids], self.keys[p], has)

    def snapshot(self, gpu=()) -> tuple:
        """Every visible block as stored records per tier (DRAM, SSD, then the HBM copies
        ``gpu`` its tier names), parents before children (by chain depth): what a router needs
        to rebuild its index."""
        linked = self._table[self._table >= 0].astype(np.int64)
        bids = linked[self.state[linked] == COMMITTED]
        bids = bids[np.argsort(self.depth[bids], kind="stable")]
        in_gpu = np.zeros(len(self.state), dtype=bool)
        in_gpu[np.asarray(list(gpu), dtype=np.int64)] = True
        out = []
        for medium, has in ((MEDIUM_CPU, self.dram[bids] != NO_SLOT),
                            (MEDIUM_STORAGE, self.ssd[bids] != NO_SLOT),
                            (MEDIUM_GPU, in_gpu[bids])):
            if medium == MEDIUM_GPU and not len(gpu):
                continue
            b = bids[has]
            ns = self.ns[b]
            parent = self.parent[b].astype(np.int64)
            has = parent >= 0
            p = np.where(has, parent, 0)
            has &= (self.state[p] != FREE) & (self.ns[p] == ns)
            out.append(Record(STORED, medium, ns, self.keys[b], self.keys[p], has))
        return tuple(out)

    def _mirror_put(self, bid: int) -> None:
        """Publish the block as it is now: call only when its DRAM slot (if any) holds its
        whole bytes. The generation is read here, after the slot's last owner change."""
        off = int(self.dram[bid])
        if off == NO_SLOT:
            tier, off, gen = SSD, NO_OFFSET, 0
        elif self._generations is None:
            tier, off, gen = DRAM, NO_OFFSET, 0
        else:
            tier, gen = DRAM, self._generations.at(off)
        if self.gpu[bid]:
            tier = HBM       # the DRAM slot, if any, is published with it (lease-free reads)
        self._mirror.put(self._ns_tags[int(self.ns[bid])], int(self.keys[bid, 0]),
                         int(self.keys[bid, 1]), tier, off, gen)

    def _mirror_put_many(self, bids: np.ndarray) -> None:
        """_mirror_put for distinct blocks (int64 ids): one ShmIndex.put_many from
        _MIRROR_BATCH_MIN blocks on, one put each below (numpy's per-call cost: 8 blocks took
        50 µs in one put_many and 19 µs one by one, 32 blocks 52 µs and 75 µs)."""
        if len(bids) >= _MIRROR_BATCH_MIN:
            self._mirror.put_many(*self._mirror_rows(bids))
        else:
            for bid in bids.tolist():
                self._mirror_put(bid)

    def _mirror_rows(self, bids: np.ndarray) -> tuple:
        """(tags, keys, tiers, offsets, generations) of these blocks as _mirror_put publishes
        each: what ShmIndex.put_many and rebuild take."""
        tags = np.asarray(self._ns_tags + [0], dtype=np.uint64)[self.ns[bids].astype(np.int64)]
        dram = self.dram[bids]
        in_dram = dram != NO_SLOT
        tiers = np.where(self.gpu[bids] != 0, HBM, np.where(in_dram, DRAM, SSD)).astype(np.uint8)
        offs = np.full(len(bids), NO_OFFSET, dtype=np.int64)
        gens = np.zeros(len(bids), dtype=np.uint32)
        if self._generations is not None and in_dram.any():
            offs[in_dram] = dram[in_dram]
            gens[in_dram] = self._generations.of(dram[in_dram])
        return tags, self.keys[bids], tiers, offs, gens

    def resync_mirror(self) -> None:
        """Rewrite the mirror from the columns: every linked COMMITTED block."""
        linked = self._table[self._table >= 0].astype(np.int64)
        bids = linked[self.state[linked] == COMMITTED]
        self._mirror.rebuild(*self._mirror_rows(bids))

    # -- mutation ---------------------------------------------------------------------------
    def add(self, ns: int, key: bytes, parent: int, stamp: int, dram: int = NO_SLOT) -> int:
        """A new WRITING block for a key that is not in the table (callers check first), its
        bytes to be written at DRAM offset ``dram``.
        Scalar twin of add_many (a put adds its blocks one by one; numpy calls cost more)."""
        if self._n_free == 0:
            self._grow(max(self._cap // 2, 1024))
        if (self._table_used + 1) * 3 > 2 * len(self._table):
            self._rehash(extra=1)
        self._n_free -= 1
        bid = int(self._free[self._n_free])
        lo, hi = _WORDS.unpack(key)
        self.keys[bid, 0] = lo
        self.keys[bid, 1] = hi
        self.ns[bid] = ns
        self.state[bid] = WRITING
        self.dram[bid] = dram
        self.ssd[bid] = NO_SLOT
        self.stamp[bid] = stamp
        self.leases[bid] = 0
        self.hits[bid] = 0
        self.gpu[bid] = 0
        self.children[bid] = 0
        self.parent[bid] = parent
        if parent >= 0:
            self.depth[bid] = self.depth[parent] + 1
            self.children[parent] += 1
        else:
            self.depth[bid] = 0
        mask = len(self._table) - 1
        pos = (lo ^ ((ns * _NS_MIX_INT) & _U64)) & mask
        table = self._table
        while table[pos] >= 0:
            pos = (pos + 1) & mask
        table[pos] = bid
        self._table_used += 1
        self._ns_count[ns] = self._ns_count.get(ns, 0) + 1
        return bid

    def add_many(self, ns: int, keys, parents: np.ndarray, stamp: int) -> np.ndarray:
        """New WRITING blocks for keys absent from the table; their ids (ascending).
        ``parents`` are existing block ids (-1 for a chain root)."""
        q = keys_array(keys)
        n = len(q)
        if self._n_free < n:
            self._grow(max(n - self._n_free, self._cap // 2, 1024))
        bids = self._free[self._n_free - n:self._n_free][::-1].astype(np.int64)
        self._n_free -= n
        parents = np.asarray(parents, dtype=np.int64)
        self.keys[bids] = q
        self.ns[bids] = ns
        self.state[bids] = WRITING
        self.dram[bids] = NO_SLOT
        self.ssd[bids] = NO_SLOT
        self.stamp[bids] = stamp
        self.leases[bids] = 0
        self.hits[bids] = 0
        self.gpu[bids] = 0
        self.children[bids] = 0
        self.parent[bids] = parents
        has = parents >= 0
        self.depth[bids] = np.where(has, self.depth[np.where(has, parents, 0)] + 1, 0)
        np.add.at(self.children, parents[has], 1)
        self._insert(bids)
        self._ns_count[ns] = self._ns_count.get(ns, 0) + n
        return bids

    def restore_many(self, ns: int, keys, addrs: np.ndarray, csums: np.ndarray,
                     depths: np.ndarray, parent_keys: np.ndarray,
                     mirror: bool = True) -> np.ndarray:
        """Index recovered SSD blocks at once (COMMITTED, SSD only; millions per restart):
        ``keys`` absent from the table, ``parent_keys`` [n, 2] (zeros: a chain root). Their ids.
        ``mirror=False``: leave the lookup mirror alone (a load in batches resyncs it once at
        the end: until then same-host clients see these blocks as misses, never wrongly)."""
        bids = self.add_many(ns, keys, np.full(len(addrs), -1), 0)
        if mirror:
            self.publish(bids)
        else:
            self.state[bids] = COMMITTED
        self.ssd[bids] = addrs
        self.csum[bids] = csums
        self.depth[bids] = depths
        parent_keys = np.ascontiguousarray(parent_keys)
        parents = self.find_many(ns, parent_keys.tobytes())
        has = (parents >= 0) & parent_keys.any(axis=1)
        self.parent[bids[has]] = parents[has]
        np.add.at(self.children, parents[has], 1)
        if self._events is not None and len(bids):
            self._report_stored(bids, dram=False)
        return bids

    def reserve(self, n: int) -> None:
        """Make room for ``n`` more blocks now (ids and key table), so that adding them in
        batches later never grows or rehashes a large table in one go (a load in batches)."""
        if self._n_free < n:
            self._grow(max(n - self._n_free, 1024))
        if (self._table_used + n) * 3 > 2 * len(self._table):
            self._rehash(extra=n)

    def has_mirror(self) -> bool:
        return self._mirror is not None

    def _insert(self, bids: np.ndarray) -> None:
        if (self._table_used + len(bids)) * 3 > 2 * len(self._table):   # load <= 2/3
            self._rehash(extra=len(bids))
        self._place(bids)
        self._table_used += len(bids)

    def _place(self, bids: np.ndarray) -> None:
        """Put ids into the table by linear probing, vectorized (ties: first id wins a slot)."""
        pending = bids
        pos = self._home(self.ns[pending], self.keys[pending, 0])
        mask = len(self._table) - 1
        while len(pending):
            open_ = np.flatnonzero(self._table[pos] < 0)
            if len(open_):
                slots, first = np.unique(pos[open_], return_index=True)
                won = open_[first]
                self._table[slots] = pending[won]
                keep = np.ones(len(pending), dtype=bool)
                keep[won] = False
                pending, pos = pending[keep], pos[keep]
            pos = (pos + 1) & mask

    def _rehash(self, extra: int = 0) -> None:
        live = self._table[self._table >= 0].astype(np.int64)
        size = 16
        while 2 * size < 3 * (len(live) + extra) + 2:
            size *= 2
        self._table = np.full(size, _EMPTY, dtype=np.int32)
        self._place(live)
        self._table_used = len(live)

    def unlink(self, bid: int) -> None:
        """Remove the block from the key table (no longer findable); the id stays allocated.

        Parent links only order eviction. A child of an unlinked block keeps its link, so after
        the id is reused it may point at an unrelated block: that can perturb eviction order,
        never which bytes a key resolves to.
        """
        mask = len(self._table) - 1
        pos = (int(self.keys[bid, 0]) ^ ((int(self.ns[bid]) * _NS_MIX_INT) & _U64)) & mask
        while True:
            b = int(self._table[pos])
            if b == bid:
                self._table[pos] = _TOMB
                ns = int(self.ns[bid])
                self._ns_count[ns] -= 1
                if self._events is not None and self.state[bid] == COMMITTED:
                    if self.dram[bid] != NO_SLOT:
                        self._report(False, MEDIUM_CPU, bid)
                    if self.ssd[bid] != NO_SLOT:
                        self._report(False, MEDIUM_STORAGE, bid)
                if self._mirror is not None and self.state[bid] == COMMITTED:
                    self._mirror.remove(self._ns_tags[ns], int(self.keys[bid, 0]),
                                        int(self.keys[bid, 1]))
                    if self._mirror.needs_rebuild() and self._mirror.fits(self.count()):
                        self.resync_mirror()
                break
            if b == _EMPTY:
                break       # not linked (already unlinked)
            pos = (pos + 1) & mask
        parent = int(self.parent[bid])
        if parent >= 0 and self.children[parent] > 0:
            self.children[parent] -= 1
        self.parent[bid] = -1

    def release_id(self, bid: int) -> None:
        self.state[bid] = FREE
        self.dram[bid] = NO_SLOT
        self.ssd[bid] = NO_SLOT
        if self._n_free == len(self._free):
            self._free = np.concatenate([self._free, np.empty(max(1024, len(self._free) // 2),
                                                                dtype=np.int32)])
        self._free[self._n_free] = bid
        self._n_free += 1

    def _grow(self, extra: int) -> None:
        """Add ``extra`` ids. Callers grow by half the capacity: bounded over-allocation."""
        new_cap = self._cap + extra
        keys = np.zeros((new_cap, 2), dtype=np.uint64)
        keys[:self._cap] = self.keys
        self.keys = keys
        for name, dtype in _COLUMNS.items():
            col = np.zeros(new_cap, dtype=dtype)
            col[:self._cap] = getattr(self, name)
            setattr(self, name, col)
        free = np.empty(self._n_free + extra, dtype=np.int32)
        free[:self._n_free] = self._free[:self._n_free]
        free[self._n_free:] = np.arange(new_cap - 1, self._cap - 1, -1, dtype=np.int32)
        self._free = free
        self._n_free += extra
        self._cap = new_cap

    def nbytes(self) -> int:
        """Memory held by the index's arrays."""
        return (self.keys.nbytes + self._free.nbytes + self._table.nbytes +
                sum(getattr(self, name).nbytes for name in _COLUMNS))
