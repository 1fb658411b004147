"""The SSD tier: blocks move between the DRAM arena and slab files on SSD.

The store (kvstore/store/blockstore.py) stays synchronous on the event loop; this module adds the
SSD side, asked by the store and the servicer:

    persist(bids)        after a commit: with a policy that writes on commit, write the blocks to
                         SSD and wait until their journal records are fsync'd (the commit
                         answers after that); write-back only wakes its cleaner.
    clean(bids)          write-back: write the dirty blocks a DRAM eviction is about to take,
                         awaited off the event loop (the store's eviction plan,
                         BlockStore.clean_room); the eviction that follows is synchronous and
                         does no I/O (kvstore.tiers.dram.DRAMTier.make_room): a victim with an
                         SSD copy is demoted, one without dropped. ``demoted(n)`` counts them.
    fetch(bids, slots)   bring SSD-only blocks into the DRAM slots the caller hands in
                         (kvstore.tiers.dram.PromotionSlots: free slots, taken without eviction,
                         each reported back filled or unused) or the HBM pool's: parallel reads,
                         checksums verified; a checksum failure is a miss — counted, block
                         dropped. Used by gets (BlockStore.promote) and the prefetcher.
    recover(register)    rebuild the SSD part of the block table from the journal at startup.

Composed of (each built by the daemon's composition root and handed in): the block table, the
DRAM tier (read only: arena bytes, eviction candidates; its slots are the DRAM tier's to hand out
and free), the slab files (kvstore/tiers/ssd/files.py), the
catalog (journal, recovery, compaction: catalog.py), the space manager (slots, eviction,
segments: space.py), the write policy (kvstore/policies/write.py), and optionally the HBM tier
and a GPUDirect reader (gds.py) for reads straight into the HBM pool.

Protection across awaits: every block being written or read is pinned before the first await and
unpinned after its result is applied, so eviction, deletion and slot reuse never touch a slot
with I/O in flight. Concurrent fetches of one SSD block share a single read (``_promoting``).
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from kvstore.metrics.counters import TierCounters
from kvstore.policies.write import WritePolicy, WriteThrough
from kvstore.tiers.base import COMMITTED, NO_SLOT
from kvstore.tiers.ssd.bandwidth import ReadBandwidth
from kvstore.tiers.ssd.cleaner import WriteBackCleaner
from kvstore.tiers.ssd.ringio import RingIO

log = logging.getLogger("kvstore.tiers.ssd.tier")

# Bytes one I/O task moves (a get of 32 x 256 KiB blocks: 8 tasks of 1 MiB, each one vectored
# call when the slots are adjacent). Fewer, larger tasks cost fewer thread, GIL and loop
# hand-offs; more of them keep more requests at the disk. Measured on a virtio disk: 1 MiB
# tasks read as fast as 256 KiB ones with no other load and about twice as fast with a busy
# interpreter; 4 MiB tasks lost about a fifth of the quiet throughput.
GROUP_BYTES = 1 << 20
RECOVERY_BATCH = 4096      # index entries applied per event-loop turn while loading


def _indexed(fn, idxs: list[int], items: list) -> list[tuple[int, object]]:
    """fn over items[idxs] in one pool task; results paired with their index in ``items``."""
    return list(zip(idxs, fn([items[i] for i in idxs])))


async def _all_done(futs: list) -> list:
    """The results of these pool futures, in order, once every one has ended: the event loop
    is woken once, by the last to end, not once per future as gathering wrapped futures does
    (each wake-up is a thread hand-off on the loop's thread). Cancelled: the futures not
    started yet are cancelled, as a cancelled wrapped future cancels its own."""
    if not futs:
        return []
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    left = [len(futs)]
    lock = threading.Lock()

    def settle() -> None:
        if not done.done():
            done.set_result(None)

    def ended(_) -> None:        # in the pool thread that ran it (here if it had ended)
        with lock:
            left[0] -= 1
            if left[0]:
                return
        if not loop.is_closed():
            loop.call_soon_threadsafe(settle)

    for f in futs:
        f.add_done_callback(ended)
    try:
        await done
    except asyncio.CancelledError:
        for f in futs:
            f.cancel()
        raise
    return [f.result() for f in futs]


class SSDTier:
    name = "SSD"

    def __init__(self, table, dram, files, catalog, space, policy: WritePolicy | None = None,
                 *, hbm=None, gds=None, io_uring: bool = False):
        """``table``: the block table; ``dram``: the DRAM tier (kvstore.tiers.dram.DRAMTier);
        ``files``: open slab files; ``catalog``/``space``: their SSDCatalog and SSDSpace;
        ``hbm``: the HBM tier, if any; ``gds``: a kvstore.tiers.ssd.gds.KvikioSlotIO over the
        same files (SSD → CUDA pool reads), if any; ``io_uring``: promote and write through an
        io_uring on the event loop (kvstore.tiers.ssd.ringio) where the kernel allows it and no
        read limit is set, instead of the I/O threads."""
        self.table = table
        self._want_ring = io_uring and files.read_limiter is None
        self._ring: RingIO | None = None
        self.dram = dram
        self.slabs = files
        self.catalog = catalog
        self.space = space
        self.policy = policy or WriteThrough()
        self.hbm = hbm
        self.gds = gds
        self.counters = TierCounters()
        self._selected: set[int] = set()  # selective writes in flight
        self._write_tasks: set[asyncio.Task] = set()
        self._promoting: dict[int, asyncio.Future] = {}
        self._last_error_log = 0.0
        self._closed = False
        self._cleaner = WriteBackCleaner(table, dram, self._persist_pinned, files.counters,
                                         self._writable)
        self._read_bw = ReadBandwidth()
        self._loaded = asyncio.Event()   # set once the index is loaded (see start_recovery)
        self._failed = False             # the load failed: no SSD writes, journal untouched
        self._recovery: asyncio.Task | None = None
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="kvstore-ssd-load")
        # Writes while loading: open once the slots the load will restore are reserved (set
        # too when the load ends); the writes in flight, drained before its compaction.
        self._load_gate = asyncio.Event()
        self._load_writes: set[asyncio.Task] = set()
        self._written_while_loading = 0
        self._tombstones: set[tuple[int, bytes]] = set()   # (namespace index, key) deleted while loading

    @property
    def journal(self):
        return self.catalog.journal

    # -- the catalog's side, as the store and the servicer ask it -------------------------------
    def on_namespace(self, ns) -> None:
        self.catalog.on_namespace(ns)

    def recover(self, register) -> int:
        """Rebuild the SSD blocks from the journal, blocking
        (kvstore.tiers.ssd.catalog.SSDCatalog.recover); the tier is loaded after it."""
        n = self.catalog.recover(register)
        self._loaded.set()
        return n

    # -- loading the index while the daemon serves -------------------------------------------------
    @property
    def loading(self) -> bool:
        """The index is still being loaded: SSD writes are held back, capacity reads 0 ready."""
        return not self._loaded.is_set()

    def start_recovery(self, register, batch_blocks: int = RECOVERY_BATCH,
                       limit_bps: float = 0.0) -> asyncio.Task:
        """Load the SSD index in the background while the daemon serves (the daemon calls this
        once it listens). The journal is parsed and ordered off the event loop (a thread; the
        numpy work releases the GIL); the table is filled on the loop, ``batch_blocks`` entries
        at a time with a yield between batches, so requests keep being answered; at most
        ``limit_bps`` blocks/s when set (a testing/QoS knob). Until it is done:

        - blocks restored so far are visible (lookups say SSD, gets promote them);
        - write-through commits are written to SSD and answer once durable, as always: into
          free slots the load will not restore (it reserves those it will, once the journal is
          parsed; commits wait until then), journaled by appending to the journal as found, so
          a crash before the load ends loses none of them. A commit that finds no such free
          slot waits for the end of the load (SSD eviction needs the whole index). Write-back
          victims are dropped instead of demoted; no cleaner, no selective writes;
        - a key put meanwhile wins over its journaled copy (that one is dropped);
        - a key deleted meanwhile stays deleted (its journaled entry is skipped), and the
          delete answers once the load's compaction made that durable (sync_journal waits).

        A failure is logged and leaves the tier serving what it restored, writing nothing and
        leaving the journal as it found it (the next start recovers again)."""
        self._ring_io()      # set up (and logged) now rather than at the first request
        self._recovery = asyncio.get_running_loop().create_task(
            self._recover(register, max(1, batch_blocks), limit_bps))
        return self._recovery

    async def _recover(self, register, batch_blocks: int, limit_bps: float) -> None:
        cat, loop = self.catalog, asyncio.get_running_loop()
        t0 = time.monotonic()
        try:
            cat.loading = True
            read = await loop.run_in_executor(self._loader, cat.read_journal)
            by_ns, puts = cat.begin_restore(*read, register)
            plan = await loop.run_in_executor(self._loader, cat.order_restore, puts,
                                              cat.valid_slot_bytes(by_ns))
            del puts
            if not self._closed:
                self.slabs.reserve_slots(plan["addr"])
                cat.open_load_writes()
            self._load_gate.set()
            self.table.reserve(len(plan))
            n_batches, paced_from = 0, time.monotonic()
            for ns, recs in cat.batches(by_ns, plan, batch_blocks):
                if self._closed:
                    log.info("SSD tier: stopped while loading the index (%d blocks restored); "
                             "the journal is left as found", self.slabs.counters.recovered_blocks)
                    self._failed = True     # nothing may be journaled over a partial table
                    return
                cat.restore_batch(ns, recs, self._deleted_while_loading)
                n_batches += 1
                wait = 0.0
                if limit_bps:
                    wait = paced_from + self.slabs.counters.recovered_blocks / limit_bps - \
                        time.monotonic()
                await asyncio.sleep(max(0.0, wait))     # let requests in between batches
            # No more appends to the old file: the compaction's snapshot must hold them all.
            cat.load_writes = False
            while self._load_writes:
                await asyncio.gather(*self._load_writes, return_exceptions=True)
            await self.journal.idle()
            cat.finish_restore(read[0], read[2], by_ns, time.monotonic() - t0)
            self._tombstones.clear()
            await cat.compact_in_steps(4 * batch_blocks)
            if not self.journal.is_open():     # the compaction failed (logged): no appends
                raise OSError("the journal could not be rewritten")
        except Exception:
            self._failed = True
            log.exception("SSD tier: loading the index failed; serving the %d blocks restored, "
                          "writing nothing to SSD, journal left as found (a restart recovers "
                          "again)", self.slabs.counters.recovered_blocks)
            return
        finally:
            cat.load_writes = False
            self._load_gate.set()
            self._loaded.set()
        log.info("SSD tier: index loaded in %.2fs (%d blocks in %d batches; %d blocks written "
                 "to SSD meanwhile)", time.monotonic() - t0,
                 self.slabs.counters.recovered_blocks, n_batches, self._written_while_loading)
        if self.policy.on_eviction:
            self._kick_cleaner()

    def _deleted_while_loading(self, ns, keys: np.ndarray):
        """restore_batch's skip mask: entries whose key was deleted during the load."""
        if not self._tombstones:
            return None
        return np.fromiter(((ns.index, k) in self._tombstones
                            for k in map(bytes, keys)), dtype=bool, count=len(keys))

    def on_delete(self, ns_index: int, keys) -> None:
        """The store deleted these keys: while loading, their journaled entries must not land."""
        if self.loading:
            self._tombstones.update((ns_index, bytes(k)) for k in keys)

    def _writable(self) -> bool:
        return not self._closed and not self._failed and not self.loading

    async def sync_journal(self) -> None:
        """Wait until what was journaled is durable; while loading, first until the load's
        compaction (a delete answered then stays deleted)."""
        if self.loading:
            await self._loaded.wait()
        if self._failed:
            return
        await self.catalog.sync_journal()

    # -- slot I/O items and grouped submission ---------------------------------------------------
    def _write_item(self, bid: int, addr: int) -> tuple:
        """(addr, DRAM view, key, block bytes, slot tag): what SlabFiles.write_slot takes."""
        layout = self.table.namespace_of(bid).layout
        off = int(self.table.dram[bid])
        return (addr, self.dram.view(off, layout.slot_bytes), self.table.key_of(bid),
                layout.block_bytes, self.catalog.slot_tag(bid))

    def _read_item(self, bid: int, dest) -> tuple:
        """(addr, destination, key, block bytes, checksum): what read_slot takes."""
        layout = self.table.namespace_of(bid).layout
        return (int(self.table.ssd[bid]), dest, self.table.key_of(bid), layout.block_bytes,
                int(self.table.csum[bid]))

    def _read_items(self, bids: list[int], dests: list, layouts: list) -> list[tuple]:
        """_read_item for each block, the table's columns read once for all."""
        t = self.table
        ids = np.asarray(bids, dtype=np.int64)
        return list(zip(t.ssd[ids].tolist(), dests, t.keys_of(ids),
                        [lay.block_bytes for lay in layouts], t.csum[ids].tolist()))

    def _grouped(self, fn, items: list) -> list:
        """Submit ``fn`` over ``items`` ((addr, buffer, ...) each) as one pool task per group:
        the items in address order, cut into contiguous groups of about GROUP_BYTES (at most
        as many as I/O threads), so that slots adjacent on disk land in one group and
        SlabFiles moves them with one vectored call, while the groups keep the disk's queue
        filled. Returns concurrent futures of the groups' results (see _ungroup)."""
        if not items:
            return []
        total = sum(len(it[1]) for it in items)
        n_groups = max(1, min(len(items), self.slabs.io_threads, -(-total // GROUP_BYTES)))
        order = sorted(range(len(items)), key=lambda i: items[i][0])
        bounds = [len(order) * g // n_groups for g in range(n_groups + 1)]
        return [self.slabs.pool.submit(_indexed, fn, order[a:b], items)
                for a, b in zip(bounds, bounds[1:]) if b > a]

    @staticmethod
    def _ungroup(group_results: list[list], n: int) -> list:
        out: list = [None] * n
        for res in group_results:
            for i, r in res:
                out[i] = r
        return out

    # -- writes --------------------------------------------------------------------------------
    def _start_writes(self, bids: list[int], make_room: bool = True
                      ) -> tuple[list[tuple[int, int]], list]:
        """Allocate SSD slots (evicting only if ``make_room``) for these blocks' writes.
        Returns ((bid, addr) per write, the write items for SlabFiles.write_slots)."""
        started, writes = [], []
        for bid in bids:
            addrs = self.space.take_slots(self.table.namespace_of(bid).layout.slot_bytes, 1,
                                          make_room)
            if not addrs:
                break
            addr = addrs[0]
            self.slabs.set_owner(addr, bid)
            writes.append(self._write_item(bid, addr))
            started.append((bid, addr))
        return started, writes

    async def _write(self, writes: list) -> list:
        """Each write item's result (its checksum or the OSError): through the io_uring where
        there is one, else the I/O threads."""
        ring = self._ring_io()
        if ring is not None:
            return await ring.write_slots(writes)
        return self._ungroup(await _all_done(self._grouped(self.slabs.write_slots, writes)),
                             len(writes))

    def _finish_writes(self, started, results) -> None:
        """Apply finished writes: record them in the table and journal them in one frame."""
        idx = self.table
        done = []
        for (bid, addr), result in zip(started, results):
            if isinstance(result, BaseException):
                self.slabs.free(addr)
                self.slabs.counters.write_errors += 1
                now = time.monotonic()
                if now - self._last_error_log > 5.0:
                    self._last_error_log = now
                    log.warning("SSD write failed (%s): block stays in DRAM only; counting "
                                "further failures quietly for 5s", result)
                continue
            if idx.state[bid] != COMMITTED or idx.ssd[bid] != NO_SLOT:
                self.slabs.free(addr)    # deleted while writing
                continue
            idx.set_ssd(bid, addr, result)
            done.append(bid)
        if done:
            self.catalog.log_puts(done)

    async def persist(self, bids: list[int]) -> None:
        """After a commit: write the freshly committed blocks to SSD and wait for durability
        when the policy writes on commit. Write failures are counted and logged; the blocks
        stay in DRAM. Never raises for I/O."""
        if not self._writable():
            if self.loading and not self._closed and self.policy.on_commit:
                await self._persist_while_loading(bids)
            return
        if self.policy.on_eviction:
            self._kick_cleaner()
        if not self.policy.on_commit:
            return
        bids = self._unwritten(bids)
        if not bids:
            return
        self.table.pin(bids)
        # Shielded: a cancelled Commit must not leave pins or half-applied writes behind.
        await asyncio.shield(self._persist_pinned(bids))

    def _unwritten(self, bids: list[int]) -> list[int]:
        idx = self.table
        return [b for b in bids if idx.ssd[b] == NO_SLOT and idx.dram[b] != NO_SLOT
                and idx.state[b] == COMMITTED]

    async def _persist_while_loading(self, bids: list[int]) -> None:
        """persist() while the index loads (see start_recovery): into free slots the load does
        not claim, journaled in the file as found; what finds none waits for the load."""
        await self._load_gate.wait()
        bids = self._unwritten(bids)
        if bids and self.catalog.load_writes and not self._closed:
            self.table.pin(bids)
            task = asyncio.get_running_loop().create_task(
                self._persist_pinned(bids, make_room=False))
            self._load_writes.add(task)
            task.add_done_callback(self._load_writes.discard)
            await asyncio.shield(task)
            written = len(bids)
            bids = self._unwritten(bids)
            self._written_while_loading += written - len(bids)
        if bids:
            await self._loaded.wait()
            if self._writable():
                await self.persist(bids)

    async def _persist_pinned(self, bids: list[int], make_room: bool = True,
                              sync: bool = True) -> None:
        """Write pinned blocks, journal them and (``sync``) wait for the journal's fsync, else
        schedule it; unpins."""
        try:
            started, writes = self._start_writes(bids, make_room)
            self._finish_writes(started, await self._write(writes))
            if sync:
                await self.journal.sync()
            else:
                self.catalog.schedule_sync()
        except OSError as exc:
            log.warning("SSD journal sync failed: %s", exc)
        finally:
            self.table.unpin(bids)
        self.catalog.maybe_compact()

    def on_hits(self, bids: list[int]) -> None:
        """After a get: blocks its policy says are due (write_through_selective: read
        ``write_hits`` times) are written in the background — the get does not wait; a block
        nobody reads never costs an SSD write, and is dropped (not demoted) when DRAM evicts it."""
        if not self._writable() or not bids:
            return
        idx = self.table
        ids = np.asarray(bids, dtype=np.int64)
        due = self.policy.due(idx.hits[ids])
        if not due.any():
            return
        due = [b for b in ids[due].tolist() if idx.ssd[b] == NO_SLOT
               and idx.dram[b] != NO_SLOT and b not in self._selected]
        if not due:
            return
        self._selected.update(due)
        idx.pin(due)
        task = asyncio.get_running_loop().create_task(self._write_selected(due))
        self._write_tasks.add(task)
        task.add_done_callback(self._write_tasks.discard)

    async def _write_selected(self, bids: list[int]) -> None:
        try:
            await self._persist_pinned(bids)      # unpins
        finally:
            self._selected.difference_update(bids)

    def write_blocking(self, bids: list[int]) -> None:
        """Write these DRAM blocks to SSD now, in parallel, blocking the caller (the shutdown
        flush; never while the daemon serves)."""
        self.table.pin(bids)
        try:
            started, writes = self._start_writes(bids)
            futs = self._grouped(self.slabs.write_slots, writes)
            self._finish_writes(started, self._ungroup([f.result() for f in futs], len(started)))
        finally:
            self.table.unpin(bids)
        self.catalog.schedule_sync()

    # -- write-back (the cleaner is kvstore.tiers.ssd.cleaner) -------------------------------------
    def _kick_cleaner(self) -> None:
        self._cleaner.kick()

    def writes_on_eviction(self) -> bool:
        """Dirty DRAM victims are written to SSD before they are demoted (write-back), now."""
        return bool(self.policy.on_eviction) and self._writable()

    async def clean(self, bids: list[int]) -> None:
        """Write these dirty DRAM blocks to SSD, awaiting the I/O pool (the event loop serves
        meanwhile): what an eviction about to take them needs (BlockStore.clean_room, the
        eviction plan). Blocks it could not write (I/O error, no SSD room, the tier stopped
        writing) stay without an SSD copy. The journal is synced in the background, as for
        write_blocking."""
        if not self.writes_on_eviction():
            return
        bids = self._unwritten(bids)
        if not bids:
            return
        self.slabs.counters.sync_demotions += len(bids)
        self.table.pin(bids)
        await asyncio.shield(self._persist_pinned(bids, sync=False))

    # -- counting what the store saw --------------------------------------------------------------
    def demoted(self, n: int) -> None:
        """DRAM eviction dropped the DRAM copy of ``n`` blocks: SSD holds their only copy."""
        self.counters.demotions += n

    def count_misses(self, n: int) -> None:
        """A get asked for ``n`` SSD blocks that could not be promoted."""
        self.counters.misses += n

    # -- reads -----------------------------------------------------------------------------------
    def direct_to_hbm(self) -> bool:
        """True when SSD blocks can be read straight into HBM slots (no DRAM bounce): a host
        pool (plain reads into its mapping) or a CUDA pool with kvikio (GPUDirect Storage)."""
        hbm = self.hbm
        return hbm is not None and (hbm.pool.backend == "host" or self.gds is not None)

    def _placed(self, block_ids: list[int], to_hbm: bool) -> np.ndarray:
        """Whether each block has its copy where a get reads it (DRAM, or HBM for ``to_hbm``)."""
        placed = self.table.dram[np.asarray(block_ids, dtype=np.int64)] != NO_SLOT
        if to_hbm and self.hbm is not None:
            placed |= np.fromiter((self.hbm.has(b) for b in block_ids), dtype=bool,
                                  count=len(block_ids))
        return placed

    def to_read(self, block_ids: list[int], to_hbm: bool = False) -> list[int]:
        """The blocks fetch would read now: on SSD, not placed yet, no read in flight (what the
        caller makes DRAM room for before it calls fetch)."""
        if not block_ids:
            return []
        ids = np.asarray(block_ids, dtype=np.int64)
        need = ids[~self._placed(block_ids, to_hbm) & (self.table.ssd[ids] != NO_SLOT)].tolist()
        promoting = self._promoting
        return [b for b in need if b not in promoting] if promoting else need

    async def fetch(self, block_ids: list[int], slots, to_hbm: bool = False) -> int:
        """Bring these pinned blocks into DRAM — or, for a client that reads HBM when the daemon
        can read SSD straight into the pool (direct_to_hbm), into HBM — sharing reads already in
        flight; returns the blocks this call read. ``slots``: the DRAM slots to read into
        (kvstore.tiers.dram.PromotionSlots; free slots only, the caller made room first): every
        slot taken is reported back filled or unused, none is freed here. Where there is no
        room the rest stay on SSD (a get then misses them)."""
        direct = to_hbm and self.direct_to_hbm()
        read = 0
        for _ in range(2):     # a shared read may have gone to the other tier: then read again
            promoting = self._promoting
            waits = {id(f): f for f in (promoting.get(b) for b in block_ids)
                     if f is not None} if promoting else {}
            need = self.to_read(block_ids, to_hbm)
            if need:
                read += await self._read_into(need, direct, slots)
            if not waits:
                break
            await asyncio.gather(*waits.values())
            if self._placed(block_ids, to_hbm).all():
                break
        return read

    async def _read_into(self, need: list[int], direct: bool, slots) -> int:
        if direct:
            offs = [o if o >= 0 else None for o in self.hbm.reserve(need)]
        else:
            offs = slots.take(need)
        # no room: the answer's prefix ends before the first block without a slot
        n = next((i for i, off in enumerate(offs) if off is None), len(offs))
        for b, off in zip(need[n:], offs[n:]):
            if off is not None:
                self._unreserve(b, off, direct, slots)
        if not n:
            return 0
        loop = asyncio.get_running_loop()
        fut = loop.create_future()     # one per batch: a get sharing any of its reads waits
        mine = [(b, off, fut) for b, off in zip(need[:n], offs[:n])]
        for b in need[:n]:
            self._promoting[b] = fut
        self.table.pin(need[:n])
        await asyncio.shield(loop.create_task(self._read_pinned(mine, direct, slots)))
        return int(self._placed(need[:n], direct).sum())

    def _unreserve(self, bid: int, off: int, into_hbm: bool, slots) -> None:
        if into_hbm:
            self.hbm.cancel_fill(bid, off)
        else:
            slots.unused(off)        # the DRAM tier takes its slot back

    def read_bps(self) -> float:
        """Measured SSD read throughput of recent promotions (bytes / wall time per batch,
        weighted by bytes: kvstore.tiers.ssd.bandwidth), capped by ssd_read_limit; 0 when
        nothing was read yet."""
        lim = self.slabs.read_limiter.rate_bps if self.slabs.read_limiter is not None else 0.0
        return self._read_bw.bps(lim)

    async def measure_read_bps(self, block_ids: list[int], max_blocks: int = 4) -> float:
        """For the planner of a daemon that has read nothing yet: read up to ``max_blocks`` of
        these SSD blocks in parallel into scratch buffers (pinned meanwhile, bytes discarded)
        and return read_bps (0 if none is on SSD)."""
        idx = self.table
        bids = [b for b in block_ids
                if idx.ssd[b] != NO_SLOT and idx.state[b] == COMMITTED][:max_blocks]
        if not bids:
            return 0.0
        idx.pin(bids)
        try:
            reads = [self._read_item(b, memoryview(bytearray(
                idx.namespace_of(b).layout.slot_bytes))) for b in bids]
            loop = asyncio.get_running_loop()
            t0 = time.monotonic()
            await asyncio.gather(*(loop.run_in_executor(self.slabs.pool, self.slabs.read_slots, [r])
                                   for r in reads))
            self._read_bw.observe(sum(len(r[1]) for r in reads), time.monotonic() - t0)
        finally:
            idx.unpin(bids)
        return self.read_bps()

    async def _read_pinned(self, mine, into_hbm: bool = False, slots=None) -> None:
        idx, ssd, hbm = self.table, self.slabs, self.hbm
        try:
            bids = [b for b, _, _ in mine]
            layouts = idx.layouts_of(np.asarray(bids, dtype=np.int64))
            dests = [hbm.dest(off, lay.slot_bytes) if into_hbm else slots.view(off, lay.slot_bytes)
                     for (_, off, _), lay in zip(mine, layouts)]
            reads = self._read_items(bids, dests, layouts)
            reader = self.gds if into_hbm and hbm.pool.backend == "cuda" else ssd
            ring = self._ring_io() if reader is ssd else None
            t0 = time.monotonic()
            if ring is not None:
                results = await ring.read_slots(reads)
            else:
                results = self._ungroup(await _all_done(self._grouped(reader.read_slots, reads)),
                                        len(reads))
            self._read_bw.observe(sum(len(r[1]) for r in reads), time.monotonic() - t0)
            got, got_offs = [], []
            for (b, off, _), r in zip(mine, results):
                if r is True:
                    got.append(b)
                    got_offs.append(off)
                else:
                    self._unreserve(b, off, into_hbm, slots)
                    self._failed_read(b, r)
            if into_hbm:
                for b, off in zip(got, got_offs):
                    hbm.adopt(b, off)
            elif got:
                slots.filled(got, got_offs)
            self.counters.promotions += len(got)
            self.counters.hits += len(got)
        finally:
            self._settled(mine)

    def _ring_io(self) -> RingIO | None:
        """The io_uring, opened on first use (on the event loop); None where it is not wanted,
        cannot be set up, or was given up."""
        ring = self._ring
        if ring is None and self._want_ring and not self._closed:
            ring = self._ring = RingIO.open(self.slabs, asyncio.get_running_loop())
            self._want_ring = False
            if ring is None:
                log.info("io_uring is not available here: SSD reads and writes use the I/O "
                         "threads")
            else:
                log.info("SSD reads and writes go through io_uring on the event loop")
        return ring if ring is not None and not ring.broken else None

    def _settled(self, mine) -> None:
        """The reads of ``mine`` ((block, slot, future) each) ended, placed or not: gets
        waiting for them go on, and the blocks are unpinned."""
        promoting = self._promoting
        for b, _, fut in mine:
            promoting.pop(b, None)
            if not fut.done():
                fut.set_result(None)
        self.table.unpin([b for b, _, _ in mine])

    def _failed_read(self, bid: int, err) -> None:
        """A block whose read failed (``err``: the OSError) or whose bytes did not verify
        (False: wrong bytes or a short read): counted, logged, dropped from the store."""
        key = self.table.key_of(bid).hex()[:12]
        if isinstance(err, BaseException):
            self.slabs.counters.read_errors += 1
            log.warning("SSD read of block %s failed (%s): treated as a miss", key, err)
        else:
            self.slabs.counters.checksum_failures += 1
            log.warning("SSD block %s failed its checksum: dropped, never served", key)
        self.table.discard(bid)

    # -- layer-wise reads (AcquireLayers) ---------------------------------------------------------
    async def wait_reads(self, block_ids: list[int]) -> None:
        """Wait for the reads other gets have in flight for any of these blocks."""
        waits = {id(f): f for f in (self._promoting.get(b) for b in block_ids) if f is not None}
        if waits:
            await asyncio.gather(*waits.values())

    def begin_layers(self, block_ids: list[int], slots) -> list[tuple[int, int, asyncio.Future]]:
        """Take a DRAM slot for each of these pinned SSD-only blocks (none has a read in flight:
        the caller waited for those, kvstore.store.blockstore.BlockStore.begin_layers) and
        mark them as being promoted; stops at the first block without room. Returns (block,
        slot, future) for read_layers, which owns them from here."""
        offs = slots.take(block_ids)
        fut = asyncio.get_running_loop().create_future()     # one for the batch, as fetch's
        mine = []
        for b, off in zip(block_ids, offs):
            if off is None:
                break
            self._promoting[b] = fut
            mine.append((b, off, fut))
        self.table.pin([b for b, _, _ in mine])
        return mine

    def layer_ranges(self, layout) -> list[tuple[int, int]]:
        """The (start, length) payload ranges a layer-wise read moves, one per layer, in order:
        whole layers when they tile the block and (with O_DIRECT) keep 4 KiB alignment, else one
        range of the whole block (it arrives at once)."""
        lb, n = layout.layer_bytes, layout.num_layers
        if lb * n != layout.block_bytes or (self.slabs.direct and lb % 4096):
            return [(0, layout.block_bytes)]
        return [(i * lb, lb) for i in range(n)]

    async def read_layers(self, mine, layout, slots, on_range=None) -> int:
        """Read the blocks begin_layers took, range by range (layer_ranges): range r of every
        block before any block's range r + 1, ``on_range(r + 1)`` after each (on the loop).
        Each block's bytes feed a streaming checksum, checked once the block is complete: the
        blocks that verify become DRAM copies (as a promotion's do), in order up to the first
        that does not; that one (I/O error: a miss; wrong bytes: dropped) and the rest give
        their slots back. Returns how many leading blocks of ``mine`` were placed. Every slot,
        pin and promotion future is settled, even if this fails. Run it as a task of its own
        that nobody cancels (ReadPath.get_layers shields it): a cancelled wait would hand back
        slots that reads still in the pool are writing into. Through the io_uring where there
        is one (_read_layers_ring), else range by range in the pool."""
        import xxhash
        idx, ssd = self.table, self.slabs
        ranges = self.layer_ranges(layout)
        ok = [True] * len(mine)
        errors: list = [None] * len(mine)    # an OSError, False (short read or wrong bytes)
        try:
            hashers = [xxhash.xxh3_64(seed=int.from_bytes(idx.key_of(b)[:8], "little"))
                       for b, _, _ in mine]
            addrs = [int(idx.ssd[b]) for b, _, _ in mine]
            views = [slots.view(off, layout.slot_bytes) for _, off, _ in mine]
            ring = self._ring_io()
            if ring is not None:
                await self._read_layers_ring(ring, ranges, addrs, views, hashers, ok, errors,
                                             on_range)
            else:
                for r, (start, n) in enumerate(ranges):
                    items = [(addrs[i], views[i][start:start + n], start, hashers[i])
                             for i in range(len(mine)) if ok[i]]
                    live = [i for i in range(len(mine)) if ok[i]]
                    done = await _all_done(self._grouped(ssd.read_ranges, items))
                    for i, res in zip(live, self._ungroup(done, len(items))):
                        if res is not True:
                            ok[i], errors[i] = False, res
                    if on_range is not None:
                        on_range(r + 1)
            # Not observed as the tier's read bandwidth: per-layer passes wait on one another
            # (and on the loop between them), so they would understate the disk the planner
            # prices; whole-slot promotions measure it.
            for i, (b, _, _) in enumerate(mine):
                if ok[i] and hashers[i].intdigest() != int(idx.csum[b]):
                    ok[i], errors[i] = False, False
        except BaseException:
            ok = [False] * len(mine)     # cancelled: nothing is placed, nothing blamed
            raise
        finally:
            placed = self._settle_layers(mine, ok, errors, slots)
        return placed

    async def _read_layers_ring(self, ring: RingIO, ranges, addrs, views, hashers, ok: list,
                                errors: list, on_range) -> None:
        """read_layers' reads through the io_uring: every range of every block is queued at
        once, range-major, so the disk's queue stays full across ranges instead of draining
        between them; the results are taken in that order (each block's hasher is fed in
        order, ``on_range`` follows the slowest block). Returns only once every read has ended:
        the slots must not go back while the kernel writes into them."""
        ssd = self.slabs
        rows = []
        for start, n in ranges:
            row = []
            for i, addr in enumerate(addrs):
                seg, off = ssd.payload_offset(addr)
                row.append(ring.read(seg.fd, off + start, [views[i][start:start + n]]))
            rows.append(row)
        ring.submit()
        try:
            for r, (start, n) in enumerate(ranges):
                for i, fut in enumerate(rows[r]):
                    res = await fut
                    if not ok[i]:
                        continue
                    if res == n:
                        hashers[i].update(views[i][start:start + n])
                        ssd.count_reads(1 if start == 0 else 0, n)
                    else:
                        ok[i] = False
                        errors[i] = OSError(-res, os.strerror(-res)) if res < 0 else False
                if on_range is not None:
                    on_range(r + 1)
        finally:
            for row in rows:
                for fut in row:
                    if not fut.done():
                        await asyncio.wait([fut])

    def _settle_layers(self, mine, ok: list[bool], errors: list, slots) -> int:
        """Publish the leading verified blocks; give the rest's slots back (a block whose read
        failed or whose bytes did not verify is dropped, as for a whole-slot read: never
        served); resolve the promotion futures; unpin. Returns blocks placed."""
        idx = self.table
        placed = 0
        for i, (b, off, _) in enumerate(mine):
            if ok[i] and placed == i and idx.state[b] == COMMITTED:
                placed += 1
            else:
                slots.unused(off)
                if errors[i] is not None:   # None: not placed after an earlier failure
                    self._failed_read(b, errors[i])
        if placed:
            slots.filled([b for b, _, _ in mine[:placed]], [off for _, off, _ in mine[:placed]])
        self.counters.promotions += placed
        self.counters.hits += placed
        self._settled(mine)
        return placed

    # -- shutdown --------------------------------------------------------------------------------
    async def close(self) -> None:
        """Flush write-back blocks, sync and compact the journal, close the files. Stopped
        while loading (or after a failed load): close the files, leaving the journal as found
        (the next start recovers everything)."""
        self._closed = True
        self.catalog.close()
        if self._recovery is not None and not self._recovery.done():
            await asyncio.gather(self._recovery, return_exceptions=True)  # stops at a batch
        while self._load_writes:      # journaled in the file as found before it is closed
            await asyncio.gather(*self._load_writes, return_exceptions=True)
        await self._close_ring()
        if self.loading or self._failed or self.catalog.loading:
            await asyncio.get_running_loop().run_in_executor(None, self._loader.shutdown)
            self.abandon()
            return
        self._loader.shutdown(wait=False)
        await self._cleaner.wait()
        if self._write_tasks:
            await asyncio.gather(*self._write_tasks, return_exceptions=True)
        await self.catalog.idle()      # a background compaction building its snapshot
        await self.journal.idle()      # a flush or background rewrite
        idx = self.table
        if self.policy.on_eviction:
            log.info("write-back: %d blocks written ahead of eviction by the cleaner, %d while "
                     "an eviction waited", self.slabs.counters.cleaned,
                     self.slabs.counters.sync_demotions)
            dirty = np.flatnonzero((idx.state == COMMITTED) & (idx.dram != NO_SLOT) &
                                   (idx.ssd == NO_SLOT)).tolist()
            if dirty:
                log.info("flushing %d write-back blocks to SSD", len(dirty))
                for i in range(0, len(dirty), 1024):
                    self.write_blocking(dirty[i:i + 1024])
        try:
            self.journal.flush_blocking()
            self.catalog.compact()
        finally:
            self.journal.close()
            self.slabs.close()

    async def _close_ring(self, wait_s: float = 10.0) -> None:
        """Close the io_uring once its requests have ended (they use arena slots until then);
        one the disk never finishes is left to the kernel after ``wait_s``."""
        ring, self._ring = self._ring, None
        if ring is None:
            return
        end = time.monotonic() + wait_s
        while ring.in_flight and time.monotonic() < end:
            await asyncio.sleep(0.005)
        ring.close()

    def abandon(self) -> None:
        """Close the files without flushing or compacting: a start-up whose recovery failed
        leaves the journal as it found it."""
        self._closed = True
        self._loader.shutdown(wait=True)
        self.catalog.close()
        self.journal.close()
        self.slabs.close()

    # -- kvstore.tiers.base.Tier -----------------------------------------------------------------
    def capacity_bytes(self) -> int:
        return self.slabs.capacity_bytes

    def used_bytes(self) -> int:
        return self.slabs.used_bytes()

    def blocks(self) -> int:
        """Blocks holding an SSD slot (kept as a running count: stats sample it every second)."""
        return self.catalog.live

    def forget(self, bid: int) -> None:
        self.space.forget(bid)

    def stats_row(self):
        from kvstore.v1 import kvstore_pb2 as pb
        ssd, c, io = self.slabs, self.counters, self.slabs.counters
        # Loading the index: nothing can be written yet, so no capacity is ready (the table
        # shows "loading"); blocks and recovered_blocks count what is restored so far.
        return pb.TierStats(
            tier=pb.TIER_SSD, capacity_bytes=ssd.capacity_bytes,
            ready_bytes=0 if self.loading else ssd.capacity_bytes,
            used_bytes=ssd.used_bytes(), blocks=self.blocks(), hits=c.hits, misses=c.misses,
            evictions=self.space.evictions, bytes_in=io.bytes_written, bytes_out=io.bytes_read,
            promotions=c.promotions, demotions=c.demotions,
            checksum_failures=io.checksum_failures, recovered_blocks=io.recovered_blocks,
            io_errors=io.write_errors + io.read_errors,   # bandwidth: kvstore.metrics.model
            backend=self.io_backend())

    def io_backend(self) -> str:
        """How the tier moves slots now: "io_uring" or "threads" (stats' backend)."""
        ring = self._ring
        return "io_uring" if ring is not None and not ring.broken else "threads"
