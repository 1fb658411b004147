"""The block store: the daemon's domain logic, independent of gRPC.

Primitives, in call order (the servicer is a thin translation of these):

    open_session → register_namespace → lookup
    put:  allocate → (client copies into the arena slots) → commit(abort=False|True)
    get:  acquire  → (client copies out of the arena slots) → release
    delete, expire (called periodically), close_session (the client's stream broke)

Guarantees:
- A block is visible to lookup/acquire only after commit; an aborted or expired allocation is
  never visible.
- A leased block is never evicted and its slot never reused until the lease is released or
  expires. A release after expiry raises FailedPrecondition so the reader discards its copy.
- Slots of an allocation that expired while its writer lives stay quarantined until that
  writer's session ends, so a late write can never land in another block.
- Everything runs on the daemon's event loop thread: no locks, no awaits inside an operation.
"""
from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass

import numpy as np

from kvstore.core.arena import Arena
from kvstore.core.errors import (FailedPrecondition, InvalidArgument, NotFound, Reason,
                            ResourceExhausted)
from kvstore.store.index import COMMITTED, DELETED, NO_SLOT, BlockIndex
from kvstore.core.keys import KEY_BYTES, MalformedKeyError, namespace_digest, unpack_keys
from kvstore.core.layout import KVLayout
from kvstore.store.sessions import Allocation, IdSource, Lease, Session
from kvstore.metrics.counters import DaemonCounters, TierCounters
from kvstore.tiers.dram import SlabAllocator, make_room

log = logging.getLogger("kvstore.store.blockstore")

NO_ROOM = -2          # allocate: no slot could be freed for this block (everything leased)
ALREADY_STORED = -1   # allocate: the key is stored (or being stored): nothing to write
QUARANTINED = -3      # slot owner marker (a slot owner, not an allocate answer: own value): held until the writer's session ends


@dataclass(frozen=True)
class Namespace:
    index: int
    namespace_id: bytes
    model_id: str
    tenant: str
    layout: KVLayout


class BlockStore:
    def __init__(
        self,
        arena: Arena,
        *,
        chunk_bytes: int = 64 << 20,
        max_batch_blocks: int = 4096,
        lease_timeout_s: float = 30.0,
        allocation_timeout_s: float = 30.0,
        clock=time.monotonic,
        generations=None,
        snapshot=None,
    ):
        self.arena = arena
        # kvstore.core.slotgen.SlotGenerations of the arena (None: readers confirm their releases)
        self.generations = generations
        # Only the arena's prepared prefix is handed out; the daemon marks the rest ready
        # as its ArenaPreparer reserves it.
        self.slabs = SlabAllocator(arena.size_bytes, chunk_bytes, generations,
                                   ready_bytes=arena.reserved_bytes)
        # snapshot: kvstore.core.shmindex.ShmIndex that the index mirrors what lookups see into
        self.index = BlockIndex(mirror=snapshot)
        self.max_batch_blocks = max_batch_blocks
        self.lease_timeout_s = lease_timeout_s
        self.allocation_timeout_s = allocation_timeout_s
        self.clock = clock
        self.started_at = clock()
        self.namespaces: dict[bytes, Namespace] = {}
        self._ns_by_index: list[Namespace] = []
        self.sessions: dict[int, Session] = {}
        self._new_id = IdSource()
        self._expired_leases: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.dram = TierCounters()
        self.counters = DaemonCounters()
        self.tiering = None   # kvstore.tiers.ssd.tier.Tiering when an SSD tier is configured
        self.hbm = None       # kvstore.tiers.hbm.HBMTier when an HBM tier is configured
        self.prefetcher = None   # kvstore.prefetch.prefetcher.Prefetcher (set by the daemon)

    # -- sessions and namespaces -----------------------------------------------------------
    def open_session(self, client_name: str = "", pid: int = 0) -> Session:
        s = Session(self._new_id(), client_name, pid)
        self.sessions[s.session_id] = s
        return s

    def close_session(self, session_id: int) -> None:
        s = self.sessions.pop(session_id, None)
        if s is None:
            return
        for lease in s.leases.values():
            if lease.hbm_fill:
                self.hbm.finish(self, lease.hbm_fill, ok=False)
            self._unlease(lease)
        for alloc in s.allocations.values():
            self._abort(alloc)
        for off in s.quarantined_slots:
            self.slabs.free(off)
        if self.hbm is not None:
            self.hbm.free_quarantined(s.quarantined_hbm)
        if s.leases or s.allocations:
            self.counters.sessions_reclaimed += 1
            log.info("session %d (%s pid %d) ended: reclaimed %d leases, %d allocations",
                     session_id, s.client_name, s.pid, len(s.leases), len(s.allocations))

    def register_namespace(self, model_id: str, layout: KVLayout, tenant: str = "") -> Namespace:
        if not model_id:
            raise InvalidArgument("model_id must not be empty", Reason.BAD_ARGUMENT)
        try:
            self.slabs.size_class(layout.slot_bytes)
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
        ns = Namespace(len(self._ns_by_index), digest, model_id, tenant, layout)
        self.index.name_namespace(ns.index, digest)
        self.namespaces[digest] = ns
        self._ns_by_index.append(ns)
        if self.tiering is not None:
            self.tiering.on_namespace(ns)
        log.info("namespace %s: model %r tenant %r, %s (%d bytes/block)",
                 digest.hex()[:12], model_id, tenant, layout.describe(), layout.block_bytes)
        return ns

    # -- lookup ------------------------------------------------------------------------------
    def lookup(self, namespace_id: bytes, keys_blob: bytes) -> tuple[int, list[str]]:
        ns = self._namespace(namespace_id)
        keys = self._keys(keys_blob)
        stamp = self.index.tick()
        idx = self.index
        tiers: list[str] = []
        for bid in idx.find_many(ns.index, keys).tolist():
            if bid < 0 or idx.state[bid] != COMMITTED:
                break
            idx.stamp[bid] = stamp
            tiers.append(self._tier_of(bid))
        self.counters.lookups += 1
        return len(tiers), tiers

    def cached_prefix(self, namespace_id: bytes, keys_blob: bytes) -> tuple[Namespace, list[bytes], int]:
        """(namespace, keys, n): the first n keys are committed in a local tier. Counts and
        stamps nothing (the remote tier asks before a get); raises as lookup does."""
        ns = self._namespace(namespace_id)
        keys = self._keys(keys_blob)
        n = 0
        idx = self.index
        for bid in idx.find_many(ns.index, keys).tolist():
            if bid < 0 or idx.state[bid] != COMMITTED:
                break
            n += 1
        return ns, keys, n

    # -- put ---------------------------------------------------------------------------------
    def allocate(self, session_id: int, namespace_id: bytes, keys_blob: bytes,
                 parent_key: bytes = b"") -> tuple[int, list[int]]:
        """Reserve slots for the keys not yet stored. Returns (allocation id, offsets).

        offsets[i] >= 0: write block i there; ALREADY_STORED: skip it; NO_ROOM: no slot could
        be made free for it (every slot of its size is leased) — then neither it nor any later
        block of the batch is stored, so what is stored stays a prefix.
        """
        s = self._session(session_id)
        ns = self._namespace(namespace_id)
        keys = self._keys(keys_blob)
        if len(set(keys)) != len(keys):
            raise InvalidArgument("duplicate keys in one batch", Reason.BAD_KEYS)
        if parent_key and len(parent_key) != KEY_BYTES:
            raise InvalidArgument(f"parent_key must be {KEY_BYTES} bytes, got {len(parent_key)}",
                                  Reason.BAD_KEYS)
        idx = self.index
        stamp = idx.tick()
        parent = idx.find(ns.index, parent_key) if parent_key else -1
        present = idx.find_many(ns.index, keys).tolist()
        n_new = sum(1 for b in present if b < 0)
        # The batch's already-stored blocks must survive the eviction that makes room for it.
        kept = np.asarray([b for b in present if b >= 0], dtype=np.int64)
        idx.leases[kept] += 1
        try:
            self._make_room(ns.layout.slot_bytes, n_new)
        finally:
            idx.leases[kept] -= 1

        # Take the batch's slots up front and hand them out in address order: adjacent slots
        # for consecutive blocks let clients copy a whole run at once.
        fresh: list[int] = []
        while len(fresh) < n_new:
            off = self.slabs.allocate(ns.layout.slot_bytes)
            if off is None:
                break
            fresh.append(off)
        fresh.sort(reverse=True)
        block_ids: list[int] = []
        offsets: list[int] = []
        for key, bid in zip(keys, present):
            if bid >= 0:
                if idx.state[bid] == COMMITTED:
                    idx.stamp[bid] = stamp
                block_ids.append(-1)
                offsets.append(ALREADY_STORED)
                parent = bid
                continue
            off = fresh.pop() if fresh else None
            if off is None:
                block_ids.append(-1)
                offsets.append(NO_ROOM)
                continue
            bid = idx.add(ns.index, key, parent, stamp)
            idx.dram[bid] = off
            self.slabs.set_owner(off, bid)
            block_ids.append(bid)
            offsets.append(off)
            parent = bid
        if n_new and all(o == NO_ROOM for o, b in zip(offsets, present) if b < 0):
            self.counters.puts_rejected += 1
            raise ResourceExhausted(
                f"DRAM tier full: no unleased block of {ns.layout.slot_bytes} bytes to evict "
                f"({self.slabs.capacity_bytes} bytes, {self._active_leases()} active leases)",
                Reason.NO_ROOM)
        alloc = Allocation(self._new_id(), s.session_id, ns.index, block_ids,
                           self.clock() + self.allocation_timeout_s)
        s.allocations[alloc.allocation_id] = alloc
        return alloc.allocation_id, offsets

    def write_remote(self, session_id: int, allocation_id: int, first_index: int, data) -> None:
        """Copy streamed block bytes (a remote client's put) into the allocation's slots."""
        alloc = self._allocation(session_id, allocation_id)
        layout = self._ns_by_index[alloc.ns].layout
        bb = layout.block_bytes
        if len(data) % bb:
            raise InvalidArgument(f"data is {len(data)} bytes, not a multiple of the "
                                  f"{bb}-byte block of this namespace", Reason.BAD_ARGUMENT)
        n = len(data) // bb
        if first_index + n > len(alloc.block_ids):
            raise InvalidArgument(f"blocks [{first_index}, {first_index + n}) outside the "
                                  f"allocation of {len(alloc.block_ids)} blocks",
                                  Reason.BAD_ARGUMENT)
        mv = memoryview(data)
        for i in range(n):
            bid = alloc.block_ids[first_index + i]
            if bid >= 0:
                off = int(self.index.dram[bid])
                self.arena.buffer[off:off + bb] = mv[i * bb:(i + 1) * bb]

    def commit(self, session_id: int, allocation_id: int, abort: bool = False,
               committed_out: list[int] | None = None) -> int:
        """Publish (or abort) an allocation; returns blocks published. Their ids are appended
        to ``committed_out`` (the SSD tier writes them through)."""
        alloc = self._allocation(session_id, allocation_id)
        del self.sessions[session_id].allocations[allocation_id]
        if abort:
            self._abort(alloc)
            return 0
        idx = self.index
        bb = self._ns_by_index[alloc.ns].layout.block_bytes
        published = [bid for bid in alloc.block_ids if bid >= 0]
        idx.publish(published)
        n = len(published)
        if committed_out is not None:
            committed_out.extend(published)
        self.dram.bytes_in += n * bb
        return n

    # -- get ---------------------------------------------------------------------------------
    def acquire(self, session_id: int, namespace_id: bytes, keys_blob: bytes,
                promote_out: list[int] | None = None,
                want_hbm: bool = False) -> tuple[Lease | None, list[int], list[str]]:
        """Lease the longest stored prefix of ``keys``. Returns (lease, offsets, tiers).

        Without ``promote_out`` only DRAM blocks count. With it, SSD-only blocks join the
        prefix (offset -1) and their positions are appended to ``promote_out``: the caller
        must promote them (Tiering.promote) before answering. With ``want_hbm`` a block with
        an HBM copy counts too (DRAM offset -1 if it has none): see :meth:`hbm_answer`."""
        s = self._session(session_id)
        ns = self._namespace(namespace_id)
        keys = self._keys(keys_blob)
        idx = self.index
        hbm = self.hbm if want_hbm else None
        stamp = idx.tick()
        bids: list[int] = []
        tiers: list[str] = []
        for bid in idx.find_many(ns.index, keys).tolist():
            if bid < 0 or idx.state[bid] != COMMITTED:
                break
            if hbm is not None and bid in hbm.slot:
                tiers.append("HBM")
            elif idx.dram[bid] != NO_SLOT:
                tiers.append("DRAM")
            elif promote_out is not None and idx.ssd[bid] != NO_SLOT:
                promote_out.append(len(bids))
                tiers.append("SSD")
            else:
                break
            bids.append(bid)
        in_dram = tiers.count("DRAM")
        self.dram.hits += in_dram
        self.dram.misses += len(keys) - in_dram - tiers.count("HBM")
        if hbm is not None:
            hbm.counters.hits += tiers.count("HBM")
            hbm.counters.misses += len(keys) - tiers.count("HBM")
        if not bids:
            return None, [], []
        ids = np.asarray(bids, dtype=np.int64)
        idx.stamp[ids] = stamp
        idx.leases[ids] += 1
        idx.hits[ids] = np.minimum(idx.hits[ids], 254) + 1
        self.dram.bytes_out += (len(bids) - tiers.count("HBM")) * ns.layout.block_bytes
        if hbm is not None:
            hbm.counters.bytes_out += tiers.count("HBM") * ns.layout.block_bytes
        lease = Lease(self._new_id(), s.session_id, bids, self.clock() + self.lease_timeout_s)
        s.leases[lease.lease_id] = lease
        return lease, idx.dram[ids].tolist(), tiers

    def hbm_answer(self, lease: Lease | None) -> tuple[list[int], list[int]]:
        """For a want_hbm get: (HBM offset to read each leased block from, HBM slot to fill
        with it), -1 where none. Blocks answered from DRAM get fill slots while HBM has room;
        the lease owns them until its release (see release(hbm_filled))."""
        if lease is None or self.hbm is None:
            return [], []
        hbm = self.hbm
        reads = [hbm.offset(b) for b in lease.block_ids]
        need = [b for b, o in zip(lease.block_ids, reads)
                if o < 0 and b not in hbm.filling and self.index.dram[b] != NO_SLOT]
        fill = dict(zip(need, hbm.reserve(self, need))) if need else {}
        lease.hbm_fill = {b: o for b, o in fill.items() if o >= 0}
        return reads, [lease.hbm_fill.get(b, -1) for b in lease.block_ids]

    def truncate_lease(self, session_id: int, lease: Lease, n: int) -> tuple[Lease | None, list[int]]:
        """Keep the lease's first n blocks (after a promotion); (lease or None, DRAM offsets).
        None as well when the lease ended meanwhile (session closed, expired)."""
        s = self.sessions.get(session_id)
        if s is None or s.leases.get(lease.lease_id) is not lease:
            return None, []
        if n < len(lease.block_ids):
            bb = self._ns_by_index[int(self.index.ns[lease.block_ids[0]])].layout.block_bytes
            in_hbm = self.hbm.slot if self.hbm is not None else {}
            self.dram.bytes_out -= sum(b not in in_hbm for b in lease.block_ids[n:]) * bb
        dropped, lease.block_ids = lease.block_ids[n:], lease.block_ids[:n]
        self.unpin(dropped)
        if n == 0:
            del s.leases[lease.lease_id]
            return None, []
        return lease, self.index.dram[np.asarray(lease.block_ids, dtype=np.int64)].tolist()

    def slot_generations(self, offsets: list[int]) -> list[int]:
        """The generation of each DRAM slot (0 for offset -1); [] without a table."""
        return self.generations.read(offsets) if self.generations is not None else []

    def read_remote(self, session_id: int, lease_id: int):
        """An iterator of (index, bytes) of each leased block, for a remote client's get.

        Raises FailedPrecondition now for an unknown lease. Each block is copied when the
        iterator reaches it, and only while the lease still holds (the stream yields between
        blocks, and a session that ended meanwhile may have let the slots be reused): once the
        lease is gone the iterator stops, and the client gets a shorter prefix."""
        s = self._session(session_id)
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
            layout = self._ns_by_index[int(self.index.ns[bid])].layout
            off = int(self.index.dram[bid])
            yield i, bytes(self.arena.buffer[off:off + layout.block_bytes])

    def release(self, session_id: int, lease_id: int, hbm_filled: bool = False) -> None:
        """End a lease. ``hbm_filled``: the client copied the blocks into the lease's HBM fill
        slots, which become the blocks' HBM copies (otherwise the slots are freed)."""
        s = self._session(session_id)
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
            self.hbm.finish(self, lease.hbm_fill, ok=hbm_filled)
        self._unlease(lease)

    def abandon_lease(self, session_id: int, lease: Lease | None) -> None:
        """End a lease that was never answered (its Acquire failed or was cancelled), so its
        blocks are not pinned until expiry. A lease that already ended is left alone."""
        s = self.sessions.get(session_id)
        if lease is None or s is None or s.leases.get(lease.lease_id) is not lease:
            return
        del s.leases[lease.lease_id]
        if lease.hbm_fill:
            self.hbm.finish(self, lease.hbm_fill, ok=False)
        self._unlease(lease)

    # -- delete and housekeeping --------------------------------------------------------------
    def delete(self, namespace_id: bytes, keys_blob: bytes) -> int:
        ns = self._namespace(namespace_id)
        keys = self._keys(keys_blob)
        idx = self.index
        n = 0
        for bid in idx.find_many(ns.index, keys).tolist():
            if bid < 0 or idx.state[bid] != COMMITTED:
                continue
            idx.unlink(bid)
            if idx.leases[bid]:
                idx.state[bid] = DELETED
            else:
                self._drop(bid)
            n += 1
        return n

    def expire(self) -> None:
        now = self.clock()
        for s in self.sessions.values():
            for lease in [l for l in s.leases.values() if l.deadline < now]:
                del s.leases[lease.lease_id]
                if lease.hbm_fill:   # the client may still be copying into them
                    self.hbm.finish(self, lease.hbm_fill, ok=False, quarantine=s.quarantined_hbm)
                self._unlease(lease)
                self._expired_leases[lease.lease_id] = None
                if len(self._expired_leases) > 65536:
                    self._expired_leases.popitem(last=False)
                self.counters.leases_expired += 1
            for alloc in [a for a in s.allocations.values() if a.deadline < now]:
                del s.allocations[alloc.allocation_id]
                self._abort(alloc, quarantine=s)
                self.counters.allocations_expired += 1

    # -- internals ---------------------------------------------------------------------------
    def _session(self, session_id: int) -> Session:
        s = self.sessions.get(session_id)
        if s is None:
            raise NotFound(f"unknown session {session_id}: open a session first (or reconnect)",
                           Reason.UNKNOWN_SESSION)
        return s

    def _namespace(self, namespace_id: bytes) -> Namespace:
        ns = self.namespaces.get(bytes(namespace_id))
        if ns is None:
            raise NotFound(f"unknown namespace {bytes(namespace_id).hex() or '(empty)'}: "
                           "register it first", Reason.UNKNOWN_NAMESPACE)
        return ns

    def _keys(self, blob: bytes) -> list[bytes]:
        try:
            keys = unpack_keys(bytes(blob))
        except MalformedKeyError as exc:
            raise InvalidArgument(str(exc), Reason.BAD_KEYS) from None
        if len(keys) > self.max_batch_blocks:
            raise InvalidArgument(f"batch of {len(keys)} blocks exceeds max_batch_blocks="
                                  f"{self.max_batch_blocks}; split it", Reason.BATCH_TOO_LARGE)
        return keys

    def _allocation(self, session_id: int, allocation_id: int) -> Allocation:
        s = self._session(session_id)
        alloc = s.allocations.get(allocation_id)
        if alloc is None:
            raise FailedPrecondition(f"allocation {allocation_id} is unknown, already committed, "
                                     "or expired", Reason.UNKNOWN_ALLOCATION)
        return alloc

    def _tier_of(self, bid: int) -> str:
        if self.hbm is not None and bid in self.hbm.slot:
            return "HBM"
        return "DRAM" if self.index.dram[bid] != NO_SLOT else "SSD"

    def namespace_of(self, bid: int) -> Namespace:
        return self._ns_by_index[int(self.index.ns[bid])]

    def slot_bytes_of(self, bid: int) -> int:
        return self._ns_by_index[int(self.index.ns[bid])].layout.slot_bytes

    def block_bytes_of(self, bid: int) -> int:
        return self._ns_by_index[int(self.index.ns[bid])].layout.block_bytes

    def _unlease(self, lease: Lease) -> None:
        self.unpin(lease.block_ids)

    def pin(self, bids: list[int]) -> None:
        """Protect blocks from eviction, deletion and slot reuse (I/O in flight on them)."""
        for bid in bids:
            self.index.leases[bid] += 1

    def unpin(self, bids: list[int]) -> None:
        idx = self.index
        for bid in bids:
            idx.leases[bid] -= 1
            if idx.leases[bid] == 0 and idx.state[bid] == DELETED:
                self._drop(bid)

    def discard(self, bid: int) -> None:
        """Forget one block now (checksum failure, SSD eviction); freed once unpinned."""
        idx = self.index
        if idx.state[bid] != COMMITTED:
            return
        idx.unlink(bid)
        if idx.leases[bid]:
            idx.state[bid] = DELETED
        else:
            self._drop(bid)

    def promotion_slots(self, bids: list[int]) -> list[int | None]:
        """A DRAM slot for each (pinned, SSD-only) block, owned by it; None where no room."""
        idx = self.index
        by_class: dict[int, int] = {}
        for bid in bids:
            sb = self._ns_by_index[int(idx.ns[bid])].layout.slot_bytes
            by_class[sb] = by_class.get(sb, 0) + 1
        for sb, n in by_class.items():
            self._make_room(sb, n)
        out: list[int | None] = []
        for bid in bids:
            off = self.slabs.allocate(self._ns_by_index[int(idx.ns[bid])].layout.slot_bytes)
            if off is not None:
                self.slabs.set_owner(off, bid)
            out.append(off)
        return out

    def _abort(self, alloc: Allocation, quarantine: Session | None = None) -> None:
        for bid in alloc.block_ids:
            if bid < 0:
                continue
            off = int(self.index.dram[bid])
            self.index.unlink(bid)
            self.index.release_id(bid)
            if quarantine is not None:
                self.slabs.set_owner(off, QUARANTINED)
                quarantine.quarantined_slots.append(off)
            else:
                self.slabs.free(off)

    def _drop(self, bid: int) -> None:
        """Forget a block that is unlinked (or about to be) and unleased; free its slot."""
        idx = self.index
        if idx.state[bid] != DELETED:
            idx.unlink(bid)
        off = int(idx.dram[bid])
        if off != NO_SLOT:
            self.slabs.free(off)
        if self.tiering is not None:
            self.tiering.forget_ssd(bid)
        if self.hbm is not None:
            self.hbm.drop(bid)
        idx.release_id(bid)

    def _evict(self, victims: list[int]) -> None:
        """Make DRAM room: demote victims that have (or get) an SSD copy, drop the rest."""
        idx = self.index
        if self.tiering is not None:
            self.tiering.prepare_demotion(victims)
        for bid in victims:
            if self.tiering is not None and self.tiering.can_demote(bid):
                self.slabs.free(int(idx.dram[bid]))
                idx.set_dram(bid, NO_SLOT)
                self.dram.demotions += 1
            else:
                self._drop(bid)
        self.dram.evictions += len(victims)

    def _evictable(self, slot_bytes: int) -> np.ndarray:
        idx = self.index
        owners = self.slabs.owners(slot_bytes)
        # dram == NO_SLOT: a slot being filled by a promotion (its block is pinned anyway)
        mask = (idx.state[owners] == COMMITTED) & (idx.leases[owners] == 0) & (idx.dram[owners] != NO_SLOT)
        return owners[mask]

    def _make_room(self, slot_bytes: int, n_needed: int) -> None:
        """Evict least valuable unleased blocks until n_needed slots of this size exist."""
        make_room(self.slabs, self.index, slot_bytes, n_needed, self._evictable, self._evict)

    def _active_leases(self) -> int:
        return sum(len(s.leases) for s in self.sessions.values())

    # -- statistics --------------------------------------------------------------------------
    def tier_blocks(self) -> int:
        idx = self.index
        return int(np.count_nonzero((idx.state == COMMITTED) & (idx.dram != NO_SLOT)))

    def namespace_usage(self) -> list[tuple[Namespace, int, int]]:
        out = []
        for ns in self._ns_by_index:
            n = self.index.count(ns.index)
            out.append((ns, n, n * ns.layout.block_bytes))
        return out

    def active_leases(self) -> int:
        return self._active_leases()

    def uptime_s(self) -> float:
        return self.clock() - self.started_at
