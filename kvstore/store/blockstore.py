"""The block store: the daemon's domain logic, independent of gRPC.

Primitives, in call order (the read and write paths, kvstore.store.reads and
kvstore.store.writes, call them in this order and add the steps of the other tiers around them):

    open_session → register_namespace → lookup
    put:  allocate → (client copies into the arena slots) → commit(abort=False|True)
    get:  acquire  → [promote: SSD-only blocks read into DRAM] → (client copies out of the arena
          slots) → release
          or, same-host and lease-free: (client reads the index snapshot and the slots) →
          report_reads, after the fact and off the client's critical path
    delete, expire (called periodically), close_session (the client's stream broke)

Guarantees:
- A block is visible to lookup/acquire only after commit; an aborted or expired allocation is
  never visible.
- A leased block is never evicted and its slot never reused until the lease is released or
  expires. A release after expiry raises FailedPrecondition so the reader discards its copy.
- A slot a writer may still copy into is never reused while it can: the slots of an
  allocation that expired, or was still open when its session ended, and the HBM fill slots of
  a lease that expired or ended with its session, are quarantined until the writer's process
  exits or no longer maps the arena (kvstore.store.writers; a writer the daemon cannot watch:
  ``quarantine_timeout_s`` after its session ended). A late write can never land in another
  block. ``quarantined_bytes()`` says how much is held.
- Everything runs on the daemon's event loop thread: no locks, no awaits inside an operation
  (promote and fetch await SSD reads; every block they touch is pinned across the await).

Ownership: the store owns sessions, leases, allocations and the namespace registry's
validation; block state is the block table's (kvstore.store.table), changed only through its
methods; each tier owns its slots and counters, and the store asks it (DRAMTier.take_slots,
assign, free_slot, quarantine, make_room, count_get, ...; tests/test_architecture.py keeps it
so). The store coordinates the tiers it is built with (DRAM always, SSD and HBM when
configured): DRAM eviction demotes to SSD, a get promotes from it.

Eviction is a plan, not a nested call (:meth:`clean_room`): the path that needs DRAM slots
asks the DRAM tier for its victims, awaits the SSD writes of the dirty ones (write-back; the
I/O pool works while the event loop serves), then has the DRAM tier evict synchronously —
demoting victims with an SSD copy, never writing. A victim whose write failed is dropped, as it
always was. No call returns into the module it came from: store → DRAM tier, store → SSD tier,
SSD tier → the DRAM slots it was handed (kvstore.tiers.dram.PromotionSlots).
"""
from __future__ import annotations

import collections
import logging
import time
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np

from kvstore.core.errors import (FailedPrecondition, InvalidArgument, KVStoreError, NotFound,
                                 Reason, ResourceExhausted)
from kvstore.core.keys import KEY_BYTES, MalformedKeyError, namespace_digest, unpack_keys
from kvstore.core.layout import KVLayout
from kvstore.metrics.counters import DaemonCounters
from kvstore.store.sessions import Allocation, IdSource, Lease, Session
from kvstore.store.table import COMMITTED, NO_SLOT, BlockTable
from kvstore.store.writers import HeldSlots, WriterProcess, file_id
from kvstore.tiers.dram import DEFAULT_CHUNK_BYTES, DRAMTier

log = logging.getLogger("kvstore.store.blockstore")

NO_ROOM = -2          # allocate: no slot could be freed for this block (everything leased)
ALREADY_STORED = -1   # allocate: the key is stored (or being stored): nothing to write
RECENT_DELETES = 16384  # deleted keys remembered for late read reports (report_reads)
PLAN_ROUNDS = 8         # clean_room: write the plan's dirty victims, re-plan, at most this often


@dataclass(frozen=True)
class Namespace:
    index: int
    namespace_id: bytes
    model_id: str
    tenant: str
    layout: KVLayout


class TierSet:
    """The tiers a block can have copies in; ``forget(bid)`` frees its copy in each. The
    composition root creates it before the table (whose ``on_free`` it is) and adds each tier
    as it is built."""

    def __init__(self):
        self._tiers: list = []

    def add(self, tier) -> None:
        self._tiers.append(tier)

    def forget(self, bid: int) -> None:
        for t in self._tiers:
            t.forget(bid)


def dram_store(arena, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES, generations=None,
               snapshot=None, **kw) -> "BlockStore":
    """A store with the DRAM tier only, wired as the daemon's composition root wires it
    (in-process tests and benchmarks). ``kw``: BlockStore's options."""
    copies = TierSet()
    table = BlockTable(mirror=snapshot, on_free=copies.forget, generations=generations)
    dram = DRAMTier(arena, table, chunk_bytes, generations)
    copies.add(dram)
    return BlockStore(table, dram, **kw)


class BlockStore:
    def __init__(
        self,
        table: BlockTable,
        dram: DRAMTier,
        *,
        ssd=None,
        hbm=None,
        max_batch_blocks: int = 4096,
        lease_timeout_s: float = 30.0,
        allocation_timeout_s: float = 30.0,
        quarantine_timeout_s: float = 300.0,
        clock=time.monotonic,
    ):
        """``table``: the block table (its ``on_free`` must forget a block in every tier given
        here); ``dram``: the DRAM tier over the shared arena; ``ssd``:
        kvstore.tiers.ssd.tier.SSDTier and ``hbm``: kvstore.tiers.hbm.HBMTier, when configured.
        ``quarantine_timeout_s``: how long the quarantined slots of a writer the daemon cannot
        watch are held after its session ended (kvstore.store.writers)."""
        self.table = table
        self.dram = dram
        self.ssd = ssd
        self.hbm = hbm
        self.max_batch_blocks = max_batch_blocks
        self.lease_timeout_s = lease_timeout_s
        self.allocation_timeout_s = allocation_timeout_s
        self.quarantine_timeout_s = quarantine_timeout_s
        self.clock = clock
        self.started_at = clock()
        self.namespaces: dict[bytes, Namespace] = {}
        self.sessions: dict[int, Session] = {}
        self._new_id = IdSource()
        self._expired_leases: collections.OrderedDict[int, None] = collections.OrderedDict()
        # keys (namespace-seeded, so unique across namespaces) of the last deleted blocks
        self._recent_deletes: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._held: list[HeldSlots] = []      # quarantined slots of ended sessions
        self._quarantined_bytes = 0           # DRAM + HBM bytes quarantined (live sessions too)
        # the files a writer's process maps while it can write our slots
        self._shared_files = {f for f in (file_id(getattr(dram.arena, "path", "")),
                                          file_id(getattr(getattr(getattr(hbm, "pool", None),
                                                                  "arena", None), "path", "")))
                              if f is not None}
        self.counters = DaemonCounters()

    def tiers(self) -> list:
        """The local tiers, fastest first (kvstore.tiers.base.Tier each)."""
        return [t for t in (self.hbm, self.dram, self.ssd) if t is not None]

    # -- sessions and namespaces -----------------------------------------------------------
    def open_session(self, client_name: str = "", pid: int = 0) -> Session:
        s = Session(self._new_id(), client_name, pid)
        self.sessions[s.session_id] = s
        return s

    def outstanding(self, session_id: int) -> tuple[Collection[int], Collection[int]]:
        """The ids of the session's open allocations and of its leases, as live read-only views
        (both empty once the session is gone): what a caller counting in-flight puts and gets
        asks instead of keeping its own copy."""
        s = self.sessions.get(session_id)
        if s is None:
            return (), ()
        return s.allocations.keys(), s.leases.keys()

    def close_session(self, session_id: int, writes_ended: bool = False) -> None:
        """End a session (its client closed it, or its stream broke): its leases end, its open
        allocations are aborted. Slots its client may still be copying into (open
        allocations, HBM fills, earlier expired allocations) stay quarantined until the
        client provably cannot write them (see :meth:`release_quarantined`).

        ``writes_ended``: the caller is the session's only writer, inside the daemon, and
        none of its copies can run any more (a remote fill whose engine call has returned):
        its slots are freed at once."""
        s = self.sessions.pop(session_id, None)
        if s is None:
            return
        for lease in s.leases.values():
            if lease.hbm_fill:
                self._quarantine_hbm(s, lease.hbm_fill)
            self._unlease(lease)
        for alloc in s.allocations.values():
            self._abort(alloc, quarantine=s)
        if writes_ended:
            self._quarantined_bytes -= self._free_quarantined(s.quarantined_slots,
                                                              s.quarantined_hbm)
            s.quarantined_slots, s.quarantined_hbm = [], []
        if s.quarantined_slots or s.quarantined_hbm:
            writer = s.writer
            s.writer = None
            self._held.append(HeldSlots(
                s.session_id, s.pid, writer,
                float("inf") if writer is not None
                else self.clock() + self.quarantine_timeout_s,
                s.quarantined_slots, s.quarantined_hbm))
            self.release_quarantined()
        elif s.writer is not None:
            s.writer.close()
        if s.leases or s.allocations:
            self.counters.sessions_reclaimed += 1
            log.info("session %d (%s pid %d) ended: reclaimed %d leases, %d allocations",
                     session_id, s.client_name, s.pid, len(s.leases), len(s.allocations))

    def release_quarantined(self) -> int:
        """Free the quarantined slots of ended sessions whose writer can no longer write them
        (its process exited or maps none of the daemon's shared files; an unwatched writer's
        after quarantine_timeout_s). Returns bytes freed. Called by expire and close_session."""
        freed = 0
        now = self.clock()
        keep: list[HeldSlots] = []
        cuda_hbm = self.hbm is not None and self.hbm.pool.backend != "host"
        for h in self._held:
            if h.writer is not None:
                busy = h.writer.can_write(needs_exit=cuda_hbm and bool(h.hbm))
            else:
                busy = now < h.until
            if busy:
                keep.append(h)
                continue
            freed += self._free_quarantined(h.dram, h.hbm)
            if h.writer is not None:
                h.writer.close()
            log.info("session %d (pid %d): %d quarantined slots freed (%s)", h.session_id,
                     h.pid, len(h.dram) + len(h.hbm),
                     "its writer cannot write them" if h.writer is not None
                     else f"unwatched writer, {self.quarantine_timeout_s:g}s passed")
        self._held = keep
        self._quarantined_bytes -= freed
        return freed

    def _free_quarantined(self, dram: list[int], hbm: list[int]) -> int:
        """Free these quarantined DRAM and HBM slots; returns their bytes."""
        freed = self.dram.free_quarantined(dram)
        if hbm:
            freed += sum(self.hbm.slot_bytes(o) for o in hbm)
            self.hbm.free_quarantined(hbm)
        return freed

    def quarantined_bytes(self) -> int:
        """Bytes of DRAM and HBM slots held back from reuse because a writer may still copy
        into them (live sessions' expired allocations and fills, ended sessions' leftovers)."""
        return self._quarantined_bytes

    def _watch_writer(self, s: Session) -> None:
        """Watch the session's client process from its first write on (see writers.py)."""
        if not s.watched:
            s.watched = True
            s.writer = WriterProcess.watch(s.pid, self._shared_files)

    def _quarantine_hbm(self, s: Session, fills: dict[int, int]) -> None:
        n = len(s.quarantined_hbm)
        self.hbm.finish(fills, ok=False, quarantine=s.quarantined_hbm)
        self._quarantined_bytes += sum(self.hbm.slot_bytes(o) for o in s.quarantined_hbm[n:])

    def register_namespace(self, model_id: str, layout: KVLayout, tenant: str = "") -> Namespace:
        if not model_id:
            raise InvalidArgument("model_id must not be empty", Reason.BAD_ARGUMENT)
        try:
            self.dram.check_slot_bytes(layout.slot_bytes)
        except ValueError as exc:
            raise InvalidArgument(f"layout {layout.describe()}: {exc}", Reason.BAD_LAYOUT) from None
        digest = namespace_digest(model_id, layout, tenant)
        ns = self.namespaces.get(digest)
        if ns is not None:
            return ns
        for other in self.namespaces.values():
            if (other.model_id, other.tenant, other.layout.tp_rank, other.layout.tp_size) == (
                model_id, tenant, layout.tp_rank, layout.tp_size
            ):
                raise FailedPrecondition(
                    f"layout mismatch for model {model_id!r} (tenant {tenant!r}, tp rank "
                    f"{layout.tp_rank}): registered as [{other.layout.describe()}], "
                    f"this client declares [{layout.describe()}]", Reason.LAYOUT_MISMATCH
                )
        ns = Namespace(len(self.namespaces), digest, model_id, tenant, layout)
        self.table.add_namespace(ns)
        self.namespaces[digest] = ns
        if self.ssd is not None:
            self.ssd.on_namespace(ns)
        log.info("namespace %s: model %r tenant %r, %s (%d bytes/block)",
                 digest.hex()[:12], model_id, tenant, layout.describe(), layout.block_bytes)
        return ns

    # -- validation (also for the prefetcher and the servicer) --------------------------------
    def session(self, session_id: int) -> Session:
        s = self.sessions.get(session_id)
        if s is None:
            raise NotFound(f"unknown session {session_id}: open a session first (or reconnect)",
                           Reason.UNKNOWN_SESSION)
        return s

    def namespace(self, namespace_id: bytes) -> Namespace:
        ns = self.namespaces.get(bytes(namespace_id))
        if ns is None:
            raise NotFound(f"unknown namespace {bytes(namespace_id).hex() or '(empty)'}: "
                           "register it first", Reason.UNKNOWN_NAMESPACE)
        return ns

    def parse_keys(self, blob: bytes) -> list[bytes]:
        try:
            keys = unpack_keys(bytes(blob))
        except MalformedKeyError as exc:
            raise InvalidArgument(str(exc), Reason.BAD_KEYS) from None
        if len(keys) > self.max_batch_blocks:
            raise InvalidArgument(f"batch of {len(keys)} blocks exceeds max_batch_blocks="
                                  f"{self.max_batch_blocks}; split it", Reason.BATCH_TOO_LARGE)
        return keys

    # -- lookup ------------------------------------------------------------------------------
    def lookup(self, namespace_id: bytes, keys_blob: bytes) -> tuple[int, list[str]]:
        ns = self.namespace(namespace_id)
        keys = self.parse_keys(keys_blob)
        stamp = self.table.tick()
        bids = self.table.committed_prefix(ns.index, keys)
        self.table.touch(bids, stamp)
        self.counters.lookups += 1
        return len(bids), self._tiers_of(bids)

    def committed_prefix(self, namespace_id: bytes, keys_blob: bytes) -> tuple[Namespace, list[bytes], np.ndarray]:
        """(namespace, keys, block ids of the committed prefix in a local tier). Counts and
        stamps nothing (the remote tier and the planner ask before a get); raises as lookup."""
        ns = self.namespace(namespace_id)
        keys = self.parse_keys(keys_blob)
        return ns, keys, self.table.committed_prefix(ns.index, keys)

    def cached_prefix(self, namespace_id: bytes, keys_blob: bytes) -> tuple[Namespace, list[bytes], int]:
        """(namespace, keys, n): the first n keys are committed in a local tier."""
        ns, keys, bids = self.committed_prefix(namespace_id, keys_blob)
        return ns, keys, len(bids)

    def _tiers_of(self, bids: np.ndarray) -> list[str]:
        tiers = np.where(self.table.dram[bids] != NO_SLOT, "DRAM", "SSD").tolist()
        hbm = self.hbm
        if hbm is not None:
            tiers = ["HBM" if hbm.has(b) else t for b, t in zip(bids.tolist(), tiers)]
        return tiers

    # -- put ---------------------------------------------------------------------------------
    def allocate(self, session_id: int, namespace_id: bytes, keys_blob: bytes,
                 parent_key: bytes = b"") -> tuple[int, list[int]]:
        """Reserve slots for the keys not yet stored. Returns (allocation id, offsets).

        offsets[i] >= 0: write block i there; ALREADY_STORED: skip it; NO_ROOM: no slot could
        be made free for it (every slot of its size is leased) — then neither it nor any later
        block of the batch is stored, so what is stored stays a prefix.

        Room is made synchronously and without I/O: with a write-back SSD tier only victims
        with an SSD copy are evicted here, so a caller awaits :meth:`clean_room_for` first
        (the eviction plan: it writes the dirty victims off the event loop).
        """
        s = self.session(session_id)
        ns = self.namespace(namespace_id)
        keys = self.parse_keys(keys_blob)
        if len(set(keys)) != len(keys):
            raise InvalidArgument("duplicate keys in one batch", Reason.BAD_KEYS)
        if parent_key and len(parent_key) != KEY_BYTES:
            raise InvalidArgument(f"parent_key must be {KEY_BYTES} bytes, got {len(parent_key)}",
                                  Reason.BAD_KEYS)
        table, slot_bytes = self.table, ns.layout.slot_bytes
        self._watch_writer(s)
        stamp = table.tick()
        parent = table.find(ns.index, parent_key) if parent_key else -1
        found = table.find_many(ns.index, keys)
        present = found.tolist()
        n_new = int(np.count_nonzero(found < 0))
        # The batch's already-stored blocks must survive the eviction that makes room for it.
        kept = found[found >= 0]
        table.touch(kept[table.state[kept] == COMMITTED], stamp)
        table.pin(kept)
        try:
            self._make_room(slot_bytes, n_new)
        finally:
            table.unpin(kept)

        # Take the batch's slots up front and hand them out in address order: adjacent slots
        # for consecutive blocks let clients copy a whole run at once.
        fresh = self.dram.take_slots(slot_bytes, n_new)
        fresh.sort(reverse=True)
        block_ids: list[int] = []
        offsets: list[int] = []
        for key, bid in zip(keys, present):
            if bid >= 0:
                block_ids.append(-1)
                offsets.append(ALREADY_STORED)
                parent = bid
                continue
            off = fresh.pop() if fresh else None
            if off is None:
                block_ids.append(-1)
                offsets.append(NO_ROOM)
                continue
            bid = table.add(ns.index, key, parent, stamp, dram=off)
            self.dram.assign(off, bid)
            block_ids.append(bid)
            offsets.append(off)
            parent = bid
        if n_new and all(o == NO_ROOM for o, b in zip(offsets, present) if b < 0):
            self.counters.puts_rejected += 1
            raise ResourceExhausted(
                f"DRAM tier full: no unleased block of {slot_bytes} bytes to evict "
                f"({self.dram.capacity_bytes()} bytes, {self.active_leases()} active leases)",
                Reason.NO_ROOM)
        alloc = Allocation(self._new_id(), s.session_id, ns.index, block_ids,
                           self.clock() + self.allocation_timeout_s)
        s.allocations[alloc.allocation_id] = alloc
        return alloc.allocation_id, offsets

    def write_remote(self, session_id: int, allocation_id: int, first_index: int, data) -> None:
        """Copy streamed block bytes (a remote client's put) into the allocation's slots."""
        alloc = self._allocation(session_id, allocation_id)
        bb = self.table.namespaces()[alloc.ns].layout.block_bytes
        if len(data) % bb:
            raise InvalidArgument(f"data is {len(data)} bytes, not a multiple of the "
                                  f"{bb}-byte block of this namespace", Reason.BAD_ARGUMENT)
        n = len(data) // bb
        if first_index + n > len(alloc.block_ids):
            raise InvalidArgument(f"blocks [{first_index}, {first_index + n}) outside the "
                                  f"allocation of {len(alloc.block_ids)} blocks",
                                  Reason.BAD_ARGUMENT)
        mv = memoryview(data)
        buf, dram = self.dram.buffer, self.table.dram
        for i in range(n):
            bid = alloc.block_ids[first_index + i]
            if bid >= 0:
                off = int(dram[bid])
                buf[off:off + bb] = mv[i * bb:(i + 1) * bb]

    def commit(self, session_id: int, allocation_id: int, abort: bool = False,
               committed_out: list[int] | None = None, keep: list[bool] | None = None) -> int:
        """Publish (or abort) an allocation; returns blocks published. Their ids are appended
        to ``committed_out`` (the SSD and remote tiers write them through). ``keep``: one
        flag per block the allocation writes (offset >= 0, in order); a False one is dropped
        as an abort drops it, never published (a remote fill whose value failed its check:
        publishing it even for an instant would show it to same-host readers of the index
        snapshot)."""
        alloc = self._allocation(session_id, allocation_id)
        published = [bid for bid in alloc.block_ids if bid >= 0]
        if keep is not None and not abort and len(keep) != len(published):
            raise InvalidArgument(f"keep has {len(keep)} flags for {len(published)} written "
                                  "blocks", Reason.BAD_ARGUMENT)
        del self.sessions[session_id].allocations[allocation_id]
        if abort:
            self._abort(alloc)
            return 0
        bb = self.table.namespaces()[alloc.ns].layout.block_bytes
        if keep is not None:
            self._drop_writing([b for b, k in zip(published, keep) if not k])
            published = [b for b, k in zip(published, keep) if k]
        self.table.publish(published)
        n = len(published)
        if committed_out is not None:
            committed_out.extend(published)
        self.dram.count_put(n * bb)    # the store fills DRAM for its clients
        return n

    # -- get ---------------------------------------------------------------------------------
    def acquire(self, session_id: int, namespace_id: bytes, keys_blob: bytes,
                promote_out: list[int] | None = None,
                want_hbm: bool = False) -> tuple[Lease | None, list[int], list[str]]:
        """Lease the longest stored prefix of ``keys``. Returns (lease, offsets, tiers).

        Without ``promote_out`` only DRAM blocks count. With it, SSD-only blocks join the
        prefix (offset -1) and their positions are appended to ``promote_out``: the caller
        must :meth:`promote` them before answering. With ``want_hbm`` a block with an HBM copy
        counts too (DRAM offset -1 if it has none): see :meth:`hbm_answer`."""
        s = self.session(session_id)
        ns = self.namespace(namespace_id)
        keys = self.parse_keys(keys_blob)
        table = self.table
        hbm = self.hbm if want_hbm else None
        stamp = table.tick()
        prefix = table.committed_prefix(ns.index, keys)
        in_dram = (table.dram[prefix] != NO_SLOT).tolist()
        on_ssd = (table.ssd[prefix] != NO_SLOT).tolist() if promote_out is not None else None
        bids: list[int] = []
        tiers: list[str] = []
        for i, bid in enumerate(prefix.tolist()):
            if hbm is not None and hbm.has(bid):
                tiers.append("HBM")
            elif in_dram[i]:
                tiers.append("DRAM")
            elif on_ssd is not None and on_ssd[i]:
                promote_out.append(len(bids))
                tiers.append("SSD")
            else:
                break
            bids.append(bid)
        n_dram, n_hbm = tiers.count("DRAM"), tiers.count("HBM")
        bb = ns.layout.block_bytes
        self.dram.count_get(n_dram, len(keys) - n_dram - n_hbm, (len(bids) - n_hbm) * bb)
        if hbm is not None:
            hbm.count_get(n_hbm, len(keys) - n_hbm, n_hbm * bb)
        if not bids:
            return None, [], []
        ids = np.asarray(bids, dtype=np.int64)
        table.lease(ids, stamp)
        lease = Lease(self._new_id(), s.session_id, bids, self.clock() + self.lease_timeout_s)
        s.leases[lease.lease_id] = lease
        return lease, table.dram[ids].tolist(), tiers

    def report_reads(self, namespace_id: bytes, keys_blob: bytes, misses: int = 0,
                     lookups: int = 0) -> list[int]:
        """Account DRAM reads a same-host client made without a lease (the index snapshot's
        offsets, proven by slot generations): stamped for eviction order, hit counts raised,
        counted as DRAM gets — what acquire does for DRAM hits, without the pin. A key
        deleted since the read (one of the last RECENT_DELETES deletes) still counts as a
        DRAM hit, as the Acquire it stands for would have; other keys no longer stored
        (unknown, or evicted since the read) are skipped. ``misses``: keys those gets asked
        for and found nowhere (a get answered with a short prefix and no Acquire), counted
        as DRAM misses as acquire counts them. ``lookups``: lookups the client answered from
        the index snapshot, counted as Lookup calls.
        Returns the block ids counted that are still stored (for the SSD and remote write
        policies and the prefetcher, as after an acquire). Raises for bad input as lookup
        does."""
        ns = self.namespace(namespace_id)
        keys = self.parse_keys(keys_blob)
        table = self.table
        found = table.find_many(ns.index, keys)
        live = found >= 0
        live[live] = table.state[found[live]] == COMMITTED
        bids = found[live]
        table.count_reads(bids, table.tick(), repeats=True)   # one call carries many gets
        gone = self._recent_deletes
        deleted = sum(1 for k, ok in zip(keys, live.tolist()) if not ok and k in gone) \
            if gone and len(bids) < len(keys) else 0
        hits = len(bids) + deleted
        self.dram.count_get(hits, misses, hits * ns.layout.block_bytes)
        self.counters.reads_reported += len(keys)
        self.counters.lookups += lookups
        return bids.tolist()

    async def promote(self, session_id: int, lease: Lease, positions: list[int],
                      to_hbm: bool = False) -> tuple[Lease | None, list[int]]:
        """Bring the lease's SSD-only blocks (at ``positions``, as acquire reported them) into
        DRAM — or HBM for a client that reads it, when the SSD tier reads straight into the
        pool; answer the readable prefix as (lease or None, offsets). Blocks after the first
        failure are unleased."""
        bids = lease.block_ids
        # The lease's clock starts when it is answered: a slow read (a capped or busy disk)
        # must not expire it before the client has even seen it.
        lease.deadline = float("inf")
        try:
            await self.fetch([bids[pos] for pos in positions], to_hbm=to_hbm)
        finally:
            lease.deadline = self.clock() + self.lease_timeout_s
        hbm = self.hbm if to_hbm else None
        placed = self.table.dram[np.asarray(bids, dtype=np.int64)] != NO_SLOT
        if hbm is not None:
            placed |= np.fromiter((hbm.has(b) for b in bids), dtype=bool, count=len(bids))
        n = len(bids) if placed.all() else int(np.argmin(placed))
        self.ssd.count_misses(len(positions) - sum(1 for p in positions if p < n))
        return self.truncate_lease(session_id, lease, n)

    async def fetch(self, bids: list[int], to_hbm: bool = False) -> int:
        """Read these pinned SSD-only blocks into DRAM (or HBM, see promote), making DRAM room
        by the eviction plan as a put does; returns blocks read
        (kvstore.tiers.ssd.tier.SSDTier.fetch, handed free DRAM slots only)."""
        ssd = self.ssd
        if ssd is None:
            return 0
        if not (to_hbm and ssd.direct_to_hbm()):
            await self._room_for_reads(ssd.to_read(bids, to_hbm))
        # No await from here to the SSD tier taking its slots: the room made is its own.
        return await ssd.fetch(bids, self.dram.promotion_slots(), to_hbm=to_hbm)

    async def _room_for_reads(self, bids: list[int]) -> None:
        """DRAM room for these blocks' promotion, by the eviction plan as for a put: dirty
        victims written first (awaited), then the clean ones evicted, synchronously. The
        caller takes its slots with no await in between."""
        sizes: dict[int, int] = {}
        for layout in self.table.layouts_of(np.asarray(bids, dtype=np.int64)):
            sizes[layout.slot_bytes] = sizes.get(layout.slot_bytes, 0) + 1
        for sb, n in sizes.items():
            await self.clean_room(sb, n)
        for sb, n in sizes.items():
            self._make_room(sb, n)

    async def begin_layers(self, lease: Lease, positions: list[int]) -> tuple[list[int], list]:
        """A layer-wise promotion's start (ReadPath.get_layers): the lease's SSD-only blocks (at
        ``positions``) get DRAM slots now, and their bytes arrive later (SSDTier.read_layers).
        Reads other gets have in flight are waited for (those blocks arrive whole); DRAM room
        is made by the eviction plan, as for fetch. Returns (offsets of the lease's first n
        blocks: their DRAM slots, or the slots taken for them; n stops at the first block that
        got none, (block, slot, future) of each slot taken, for read_layers). The lease does not
        expire until end_layers."""
        ssd = self.ssd
        bids = lease.block_ids
        lease.deadline = float("inf")
        need = [bids[p] for p in positions]
        await ssd.wait_reads(need)
        await self._room_for_reads(ssd.to_read(need))
        mine = ssd.begin_layers(ssd.to_read(need), self.dram.promotion_slots())
        taken = {b: off for b, off, _ in mine}
        dram = self.table.dram
        offsets: list[int] = []
        for b in bids:
            off = int(dram[b])
            if off == NO_SLOT:
                off = taken.get(b, NO_SLOT)
                if off == NO_SLOT:
                    break
            offsets.append(off)
        return offsets, mine

    def end_layers(self, session_id: int, lease: Lease, mine: list, placed: int,
                   answered: int) -> int:
        """A layer-wise promotion's end: the lease keeps its blocks up to the first of ``mine``
        not placed (and at most the ``answered`` the client was told of); its clock starts
        now. Returns the blocks it keeps (0: it ended, or the session did)."""
        lease.deadline = self.clock() + self.lease_timeout_s
        n = answered
        if placed < len(mine):
            n = min(n, lease.block_ids.index(mine[placed][0]))
        self.ssd.count_misses(len(mine) - placed)
        kept, _ = self.truncate_lease(session_id, lease, n)
        return len(kept.block_ids) if kept is not None else 0

    def hbm_answer(self, lease: Lease | None) -> tuple[list[int], list[int]]:
        """For a want_hbm get: (HBM offset to read each leased block from, HBM slot to fill
        with it), -1 where none. Blocks answered from DRAM get fill slots while HBM has room;
        the lease owns them until its release (see release(hbm_filled))."""
        if lease is None or self.hbm is None:
            return [], []
        hbm, dram = self.hbm, self.table.dram
        reads = [hbm.offset(b) for b in lease.block_ids]
        need = [b for b, o in zip(lease.block_ids, reads)
                if o < 0 and not hbm.is_filling(b) and dram[b] != NO_SLOT]
        fill = dict(zip(need, hbm.reserve(need))) if need else {}
        lease.hbm_fill = {b: o for b, o in fill.items() if o >= 0}
        s = self.sessions.get(lease.session_id)
        if lease.hbm_fill and s is not None:
            self._watch_writer(s)
        return reads, [lease.hbm_fill.get(b, -1) for b in lease.block_ids]

    def truncate_lease(self, session_id: int, lease: Lease, n: int) -> tuple[Lease | None, list[int]]:
        """Keep the lease's first n blocks (after a promotion); (lease or None, DRAM offsets).
        None as well when the lease ended meanwhile (session closed, expired)."""
        s = self.sessions.get(session_id)
        if s is None or s.leases.get(lease.lease_id) is not lease:
            return None, []
        if n < len(lease.block_ids):
            bb = self.table.namespace_of(lease.block_ids[0]).layout.block_bytes
            hbm = self.hbm
            self.dram.uncount_reads(sum(
                not (hbm is not None and hbm.has(b)) for b in lease.block_ids[n:]) * bb)
        dropped, lease.block_ids = lease.block_ids[n:], lease.block_ids[:n]
        self.table.unpin(dropped)
        if n == 0:
            del s.leases[lease.lease_id]
            return None, []
        return lease, self.table.dram[np.asarray(lease.block_ids, dtype=np.int64)].tolist()

    def slot_generations(self, offsets: list[int]) -> list[int]:
        """The generation of each DRAM slot (0 for offset -1); [] without a table."""
        gens = self.dram.generations
        return gens.read(offsets) if gens is not None else []

    def read_remote(self, session_id: int, lease_id: int):
        """An iterator of (index, bytes) of each leased block, for a remote client's get.

        Raises FailedPrecondition now for an unknown lease. Each block is copied when the
        iterator reaches it, and only while the lease still holds (the stream yields between
        blocks, and a session that ended meanwhile may have let the slots be reused): once the
        lease is gone the iterator stops, and the client gets a shorter prefix."""
        s = self.session(session_id)
        lease = s.leases.get(lease_id)
        if lease is None:
            raise FailedPrecondition(f"lease {lease_id} is unknown, released or expired",
                                     Reason.EXPIRED_LEASE if lease_id in self._expired_leases
                                     else Reason.UNKNOWN_LEASE)
        return self._read_leased(s, lease)

    def _read_leased(self, s: Session, lease: Lease):
        for i, bid in enumerate(list(lease.block_ids)):
            if (self.sessions.get(s.session_id) is not s
                    or s.leases.get(lease.lease_id) is not lease):
                return
            layout = self.table.namespace_of(bid).layout
            off = int(self.table.dram[bid])
            yield i, bytes(self.dram.view(off, layout.block_bytes))

    def release(self, session_id: int, lease_id: int, hbm_filled: bool = False) -> None:
        """End a lease. ``hbm_filled``: the client copied the blocks into the lease's HBM fill
        slots, which become the blocks' HBM copies (otherwise the slots are freed)."""
        s = self.session(session_id)
        lease = s.leases.pop(lease_id, None)
        if lease is None:
            if lease_id in self._expired_leases:
                raise FailedPrecondition(
                    f"lease {lease_id} expired after {self.lease_timeout_s:g}s before release; "
                    "the blocks may have been reused: discard what was read",
                    Reason.EXPIRED_LEASE)
            raise FailedPrecondition(f"lease {lease_id} is unknown or already released",
                                     Reason.UNKNOWN_LEASE)
        if lease.hbm_fill:
            self.hbm.finish(lease.hbm_fill, ok=hbm_filled)
        self._unlease(lease)

    def abandon_lease(self, session_id: int, lease: Lease | None) -> None:
        """End a lease that was never answered (its Acquire failed or was cancelled), so its
        blocks are not pinned until expiry. A lease that already ended is left alone."""
        s = self.sessions.get(session_id)
        if lease is None or s is None or s.leases.get(lease.lease_id) is not lease:
            return
        del s.leases[lease.lease_id]
        if lease.hbm_fill:
            self.hbm.finish(lease.hbm_fill, ok=False)
        self._unlease(lease)

    # -- delete and housekeeping --------------------------------------------------------------
    def delete(self, namespace_id: bytes, keys_blob: bytes) -> int:
        ns = self.namespace(namespace_id)
        keys = self.parse_keys(keys_blob)
        found = self.table.find_many(ns.index, keys)
        if self.ssd is not None:
            self.ssd.on_delete(ns.index, keys)   # loading its index: entries yet to land
        # Lease-free reads of these blocks may still be on their way (report_reads).
        gone = self._recent_deletes
        for key, bid in zip(keys, found.tolist()):
            if bid >= 0:
                gone[key] = None
        while len(gone) > RECENT_DELETES:
            gone.popitem(last=False)
        return sum(self.table.discard(bid) for bid in found[found >= 0].tolist())

    def expire(self) -> None:
        now = self.clock()
        for s in self.sessions.values():
            for lease in [l for l in s.leases.values() if l.deadline < now]:
                del s.leases[lease.lease_id]
                if lease.hbm_fill:   # the client may still be copying into them
                    self._quarantine_hbm(s, lease.hbm_fill)
                self._unlease(lease)
                self._expired_leases[lease.lease_id] = None
                if len(self._expired_leases) > 65536:
                    self._expired_leases.popitem(last=False)
                self.counters.leases_expired += 1
            for alloc in [a for a in s.allocations.values() if a.deadline < now]:
                del s.allocations[alloc.allocation_id]
                self._abort(alloc, quarantine=s)
                self.counters.allocations_expired += 1
        if self._held:
            self.release_quarantined()

    # -- internals ---------------------------------------------------------------------------
    def _allocation(self, session_id: int, allocation_id: int) -> Allocation:
        s = self.session(session_id)
        alloc = s.allocations.get(allocation_id)
        if alloc is None:
            raise FailedPrecondition(f"allocation {allocation_id} is unknown, already committed, "
                                     "or expired", Reason.UNKNOWN_ALLOCATION)
        return alloc

    def _unlease(self, lease: Lease) -> None:
        self.table.unpin(lease.block_ids)

    def _abort(self, alloc: Allocation, quarantine: Session | None = None) -> None:
        self._drop_writing(alloc.block_ids, quarantine)

    def _drop_writing(self, block_ids: list[int], quarantine: Session | None = None) -> None:
        """Forget these WRITING blocks (-1 entries skipped); their slots are freed, or held
        in ``quarantine``'s session (its writer may still be copying into them)."""
        dram = self.dram
        for bid in block_ids:
            if bid < 0:
                continue
            off = self.table.drop_writing(bid)
            if quarantine is not None:
                quarantine.quarantined_slots.append(off)
                self._quarantined_bytes += dram.quarantine(off)
            else:
                dram.free_slot(off)

    async def clean_room(self, slot_bytes: int, n_needed: int) -> None:
        """The eviction plan, before a synchronous eviction for ``n_needed`` slots of this size
        (allocate, fetch): with a write-back SSD tier, ask the DRAM tier for its victims and
        write the dirty ones to SSD, awaiting the I/O pool while the event loop serves others;
        then plan again (others may have changed the order meanwhile), a few rounds at most.
        A victim the SSD tier could not write (I/O error, no SSD room) is evicted now, dropped,
        as an eviction always dropped a block it could not demote. The eviction that follows
        (no await in between: :meth:`_make_room`) takes clean victims only and does no I/O."""
        ssd = self.ssd
        if ssd is None or not ssd.writes_on_eviction():
            return
        table, dram = self.table, self.dram
        for _ in range(PLAN_ROUNDS):
            victims = dram.planned_victims(slot_bytes, n_needed)
            dirty = victims[table.ssd[victims] == NO_SLOT].tolist()
            if not dirty:
                return
            await ssd.clean(dirty)
            failed = [b for b in dirty if table.ssd[b] == NO_SLOT and table.dram[b] != NO_SLOT
                      and table.state[b] == COMMITTED and table.leases[b] == 0]
            if failed:
                dram.evict(failed)

    async def clean_room_for(self, session_id: int, namespace_id: bytes,
                             keys_blob: bytes) -> None:
        """clean_room for what allocate(session_id, namespace_id, keys_blob) will need; bad
        arguments are left for allocate to refuse."""
        if self.ssd is None or not self.ssd.writes_on_eviction():
            return
        try:
            self.session(session_id)
            ns = self.namespace(namespace_id)
            keys = self.parse_keys(keys_blob)
        except KVStoreError:
            return
        found = self.table.find_many(ns.index, keys)
        await self.clean_room(ns.layout.slot_bytes, int(np.count_nonzero(found < 0)))

    def _make_room(self, slot_bytes: int, n_needed: int) -> None:
        """Have the DRAM tier evict until n_needed slots of this size are free: synchronous, no
        I/O. With a write-back SSD tier only clean victims go (clean_room wrote the dirty ones
        first); the SSD tier counts the demoted."""
        ssd = self.ssd
        demoted = self.dram.make_room(slot_bytes, n_needed,
                                      keep_dirty=ssd is not None and ssd.writes_on_eviction())
        if demoted:
            ssd.demoted(demoted)

    # -- statistics --------------------------------------------------------------------------
    def namespace_usage(self) -> list[tuple[Namespace, int, int]]:
        out = []
        for ns in self.table.namespaces():
            n = self.table.count(ns.index)
            out.append((ns, n, n * ns.layout.block_bytes))
        return out

    def active_leases(self) -> int:
        return sum(len(s.leases) for s in self.sessions.values())

    def uptime_s(self) -> float:
        return self.clock() - self.started_at
