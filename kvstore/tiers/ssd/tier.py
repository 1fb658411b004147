"""Tiering between the DRAM arena and the SSD tier.

The store (kvstore/store/blockstore.py) stays synchronous on the event loop; this module adds the SSD side:

    persist(bids)        write-through: after a commit, write the blocks to SSD and wait until
                         their journal records are fsync'd (the commit answers after that).
    prepare_demotion()   called by DRAM eviction: with write-back, dirty victims are written to
                         SSD first (in parallel, the eviction waits); with either policy a victim
                         that has an SSD copy is demoted (DRAM copy dropped), one without is dropped.
    promote(lease, ...)  an Acquire found SSD-only blocks: read them in parallel straight into
                         fresh arena slots, verify checksums, then answer with the prefix that
                         made it to DRAM. A checksum failure is a miss: counted, block dropped.
    recover()            rebuild the SSD part of the index from the journal at startup.

The journal (recovery, compaction) and SSD space management (slots, eviction, segments) live in
kvstore/tiers/ssd/catalog.py and kvstore/tiers/ssd/space.py, mixins of Tiering; this module moves data.

Protection across awaits: every block being written or read is pinned (its lease count raised)
before the first await and unpinned after its result is applied, so eviction, deletion and slot
reuse never touch a slot with I/O in flight. Concurrent Acquires of one SSD block share a single
read (``_promoting``).
"""
from __future__ import annotations

import asyncio
import logging
import time

import numpy as np

from kvstore.store.index import COMMITTED, NO_SLOT
from kvstore.tiers.ssd.catalog import SSDJournaling
from kvstore.tiers.ssd.space import SSDSpace
from kvstore.metrics.counters import TierCounters
from kvstore.tiers.ssd import journal as jr
from kvstore.tiers.ssd.files import SSDTier

log = logging.getLogger("kvstore.tiers.ssd.tier")

WRITE_POLICIES = ("write_through", "write_back", "write_through_selective")
CLEAN_BATCH = 64


class Tiering(SSDJournaling, SSDSpace):
    def __init__(self, store, ssd: SSDTier, journal: jr.Journal, write_policy: str = "write_through",
                 write_hits: int = 1):
        if write_policy not in WRITE_POLICIES:
            raise ValueError(f"ssd write policy must be one of {WRITE_POLICIES}, got {write_policy!r}")
        self.store = store
        self.ssd = ssd
        self.journal = journal
        self.policy = write_policy
        self.write_hits = write_hits      # write_through_selective: gets before the SSD write
        self._selected: set[int] = set()  # selective writes in flight
        self._write_tasks: set[asyncio.Task] = set()
        self.counters = TierCounters()
        self._ns_ord: dict[bytes, int] = {}
        self._ns_tags: dict[bytes, bytes] = {}   # namespace -> its record in slot headers
        self._promoting: dict[int, asyncio.Future] = {}
        self._sync_task: asyncio.Task | None = None
        self._replaying = False
        self._live = 0
        self._last_error_log = 0.0
        self._rng = np.random.default_rng()
        self._closed = False
        self._cleaner: asyncio.Task | None = None
        self._read_bw = 0.0          # recent SSD read throughput (bytes/s), see read_bps
        self.gds = None              # kvstore.tiers.ssd.gds.KvikioSlotIO: SSD -> HBM pool reads
        store.tiering = self

    # -- writes --------------------------------------------------------------------------------
    def _start_writes(self, bids: list[int]) -> tuple[list[tuple[int, int]], list]:
        """Allocate SSD slots and submit the writes, one pool task per group (as many groups
        as I/O threads). Returns ((bid, addr) per write, futures of the groups' results)."""
        store, idx = self.store, self.store.index
        started, writes = [], []
        for bid in bids:
            layout = store._ns_by_index[int(idx.ns[bid])].layout
            addrs = self._ssd_slots(layout.slot_bytes, 1)
            if not addrs:
                break
            addr = addrs[0]
            self.ssd.set_owner(addr, bid)
            off = int(idx.dram[bid])
            writes.append((addr, store.arena.buffer[off:off + layout.slot_bytes],
                           idx.key_of(bid), layout.block_bytes, self.slot_tag(bid)))
            started.append((bid, addr))
        n_groups = min(len(writes), self.ssd.io_threads)
        futs = [self.ssd.pool.submit(self.ssd.write_slots, writes[g::n_groups])
                for g in range(n_groups)]
        return started, futs

    @staticmethod
    def _ungroup(group_results: list[list], n: int) -> list:
        out: list = [None] * n
        for g, res in enumerate(group_results):
            out[g::len(group_results)] = res
        return out

    def _finish_writes(self, started, results) -> None:
        """Apply finished writes: index the written blocks and journal them in one frame."""
        idx = self.store.index
        done = []
        for (bid, addr), result in zip(started, results):
            if isinstance(result, BaseException):
                self.ssd.free(addr)
                self.ssd.counters.write_errors += 1
                now = time.monotonic()
                if now - self._last_error_log > 5.0:
                    self._last_error_log = now
                    log.warning("SSD write failed (%s): block stays in DRAM only; counting "
                                "further failures quietly for 5s", result)
                continue
            if idx.state[bid] != COMMITTED or idx.ssd[bid] != NO_SLOT:
                self.ssd.free(addr)    # deleted while writing
                continue
            idx.ssd[bid] = addr
            idx.csum[bid] = result
            done.append(bid)
        if done:
            self._live += len(done)
            self.journal.append(jr.encode_puts(self._put_entries(np.asarray(done))))

    async def persist(self, bids: list[int]) -> None:
        """Write-through: write freshly committed blocks to SSD and wait for durability.

        Write failures are counted and logged; the blocks stay in DRAM. Never raises for I/O."""
        if self.policy == "write_back":
            self._kick_cleaner()
        if self.policy != "write_through":
            return
        idx = self.store.index
        bids = [b for b in bids if idx.ssd[b] == NO_SLOT and idx.dram[b] != NO_SLOT]
        if not bids:
            return
        self.store.pin(bids)
        # Shielded: a cancelled Commit must not leave pins or half-applied writes behind.
        await asyncio.shield(self._persist_pinned(bids))

    async def _persist_pinned(self, bids: list[int]) -> None:
        try:
            started, futs = self._start_writes(bids)
            groups = await asyncio.gather(*(asyncio.wrap_future(f) for f in futs))
            self._finish_writes(started, self._ungroup(groups, len(started)))
            await self.journal.sync()
        except OSError as exc:
            log.warning("SSD journal sync failed: %s", exc)
        finally:
            self.store.unpin(bids)
        self._maybe_compact()

    def on_hits(self, bids: list[int]) -> None:
        """write_through_selective (SGLang HiCache's policy of that name): a block is written to
        SSD once gets have read it ``write_hits`` times; a block nobody reads never costs an SSD
        write, and is dropped (not demoted) when DRAM evicts it. Written in the background: the
        get that crossed the threshold does not wait."""
        if self.policy != "write_through_selective" or self._closed:
            return
        idx = self.store.index
        due = [b for b in bids if idx.hits[b] >= self.write_hits and idx.ssd[b] == NO_SLOT
               and idx.dram[b] != NO_SLOT and b not in self._selected]
        if not due:
            return
        self._selected.update(due)
        self.store.pin(due)
        task = asyncio.get_running_loop().create_task(self._write_selected(due))
        self._write_tasks.add(task)
        task.add_done_callback(self._write_tasks.discard)

    async def _write_selected(self, bids: list[int]) -> None:
        try:
            await self._persist_pinned(bids)      # unpins
        finally:
            self._selected.difference_update(bids)

    def write_blocking(self, bids: list[int]) -> None:
        """Write these DRAM blocks to SSD now, in parallel, blocking the caller (write-back
        demotion and shutdown flush)."""
        self.store.pin(bids)
        try:
            started, futs = self._start_writes(bids)
            self._finish_writes(started, self._ungroup([f.result() for f in futs], len(started)))
        finally:
            self.store.unpin(bids)
        self._schedule_sync()

    # -- write-back cleaner ------------------------------------------------------------------------
    def _kick_cleaner(self) -> None:
        if not self._closed and (self._cleaner is None or self._cleaner.done()):
            self._cleaner = asyncio.get_running_loop().create_task(self._clean())

    async def _clean(self) -> None:
        """Write-back: keep the next eviction victims clean, in the background.

        While fewer than 1/8 of a size class's unleased DRAM blocks have an SSD copy, write
        the coldest dirty ones (in eviction order, CLEAN_BATCH at a time). Eviction then finds
        clean victims and demotes them without waiting; it writes synchronously only when the
        cleaner fell behind. Blocks that die young in DRAM are never written."""
        store, idx = self.store, self.store.index
        slabs = store.slabs
        while not self._closed:
            todo = []
            free_chunk_bytes = int(slabs.chunk_free.sum()) * slabs.chunk_bytes
            for cls in list(slabs.classes.values()):
                ev = store._evictable(cls.slot_bytes)
                headroom = (len(cls.free) + free_chunk_bytes // cls.slot_bytes +
                            int((idx.ssd[ev] != NO_SLOT).sum()))
                if headroom >= max(1, slabs.capacity_bytes // cls.slot_bytes // 8):
                    continue
                dirty = ev[idx.ssd[ev] == NO_SLOT]
                todo += idx.eviction_order(dirty)[:CLEAN_BATCH].tolist()
            if not todo:
                return
            store.pin(todo)
            await asyncio.shield(self._persist_pinned(todo))
            self.ssd.counters.cleaned += sum(1 for b in todo if idx.ssd[b] != NO_SLOT)
            if all(idx.ssd[b] == NO_SLOT for b in todo):
                return   # nothing could be written (disk full, I/O errors): stop, retry later

    # -- demotion (called by DRAM eviction) ------------------------------------------------------
    def prepare_demotion(self, victims: list[int]) -> None:
        if self.policy == "write_back":
            idx = self.store.index
            dirty = [b for b in victims if idx.ssd[b] == NO_SLOT]
            if dirty:
                self.ssd.counters.sync_demotions += len(dirty)
                self.write_blocking(dirty)

    def can_demote(self, bid: int) -> bool:
        ok = self.store.index.ssd[bid] != NO_SLOT
        if ok:
            self.counters.demotions += 1
        return ok

    # -- promotion -------------------------------------------------------------------------------
    async def promote(self, session_id: int, lease, positions: list[int], to_hbm: bool = False):
        """Bring the lease's SSD-only blocks (at ``positions``) into DRAM — or, for a client that
        reads HBM when the daemon can read SSD straight into the pool (``direct_to_hbm``), into
        HBM; answer the readable prefix as (lease or None, offsets). Blocks after the first
        failure are unleased."""
        store, idx = self.store, self.store.index
        bids = lease.block_ids
        # The lease's clock starts when it is answered: a slow read (a capped or busy disk)
        # must not expire it before the client has even seen it.
        lease.deadline = float("inf")
        try:
            await self.fetch([bids[pos] for pos in positions], to_hbm=to_hbm)
        finally:
            lease.deadline = store.clock() + store.lease_timeout_s
        hbm = store.hbm.slot if to_hbm and store.hbm is not None else {}
        n = 0
        while n < len(bids) and (idx.dram[bids[n]] != NO_SLOT or bids[n] in hbm):
            n += 1
        self.counters.misses += len(positions) - sum(1 for p in positions if p < n)
        return store.truncate_lease(session_id, lease, n)

    def direct_to_hbm(self) -> bool:
        """True when SSD blocks can be read straight into HBM slots (no DRAM bounce): a host
        pool (plain reads into its mapping) or a CUDA pool with kvikio (GPUDirect Storage)."""
        hbm = self.store.hbm
        return hbm is not None and (hbm.pool.backend == "host" or self.gds is not None)

    def _placed(self, b: int, to_hbm: bool) -> bool:
        if self.store.index.dram[b] != NO_SLOT:
            return True
        return to_hbm and self.store.hbm is not None and b in self.store.hbm.slot

    async def fetch(self, block_ids: list[int], to_hbm: bool = False) -> int:
        """Bring these pinned blocks into DRAM (or HBM: see promote), sharing reads already in
        flight; returns the blocks this call read. Where there is no room the rest stay on SSD
        (a get then misses them). Used by promote (a get) and by the prefetcher."""
        direct = to_hbm and self.direct_to_hbm()
        read = 0
        for _ in range(2):     # a shared read may have gone to the other tier: then read again
            waits, need = [], []
            for b in block_ids:
                fut = self._promoting.get(b)
                if fut is not None:
                    waits.append(fut)
                elif not self._placed(b, to_hbm) and self.store.index.ssd[b] != NO_SLOT:
                    need.append(b)
            if need:
                read += await self._read_into(need, direct)
            if not waits:
                break
            await asyncio.gather(*waits)
            if all(self._placed(b, to_hbm) for b in block_ids):
                break
        return read

    async def _read_into(self, need: list[int], direct: bool) -> int:
        store = self.store
        if direct:
            offs = [o if o >= 0 else None for o in store.hbm.reserve(store, need)]
            free = store.hbm.slabs.free
        else:
            offs = store.promotion_slots(need)
            free = store.slabs.free
        loop = asyncio.get_running_loop()
        mine = []
        full = False
        for b, off in zip(need, offs):
            full = full or off is None   # no room: the answer's prefix ends before this block
            if full:
                if off is not None:
                    free(off)
                    if direct:
                        store.hbm.filling.pop(b, None)
                continue
            fut = loop.create_future()
            self._promoting[b] = fut
            mine.append((b, off, fut))
        if not mine:
            return 0
        store.pin([b for b, _, _ in mine])
        await asyncio.shield(loop.create_task(self._read_pinned(mine, direct)))
        return sum(1 for b, _, _ in mine if self._placed(b, direct))

    def read_bps(self) -> float:
        """Measured SSD read throughput of recent promotions (bytes / wall time per batch,
        averaged by bytes), capped by ssd_read_limit; 0 when nothing was read yet."""
        bw = self._read_bw
        lim = self.ssd.read_limiter.rate_bps if self.ssd.read_limiter is not None else 0.0
        return min(bw, lim) if bw and lim else (bw or 0.0)

    def _observe_read(self, nbytes: int, seconds: float) -> None:
        if nbytes <= 0 or seconds <= 0:
            return
        bw = nbytes / seconds
        # Weight by bytes: a 1-block batch (latency-bound) moves the figure little.
        w = min(1.0, nbytes / (64 << 20))
        self._read_bw = bw if not self._read_bw else (1 - w) * self._read_bw + w * bw

    async def _read_pinned(self, mine, into_hbm: bool = False) -> None:
        store, idx, ssd = self.store, self.store.index, self.ssd
        hbm = store.hbm
        loop = asyncio.get_running_loop()
        try:
            reads = []
            for b, off, _ in mine:
                layout = store._ns_by_index[int(idx.ns[b])].layout
                if not into_hbm:
                    dest = store.arena.buffer[off:off + layout.slot_bytes]
                elif hbm.pool.backend == "host":
                    dest = hbm.pool.host_slot(off, layout.slot_bytes)
                else:
                    dest = hbm.pool.slot_tensor(off, layout.slot_bytes)
                reads.append((int(idx.ssd[b]), dest, idx.key_of(b), layout.block_bytes,
                              int(idx.csum[b])))
            reader = self.gds if into_hbm and hbm.pool.backend == "cuda" else ssd
            # One pool task per group of reads, as many groups as I/O threads: the same
            # parallelism, with fewer loop wake-ups per batch than one task per block.
            n_groups = min(len(reads), ssd.io_threads)
            groups = [reads[g::n_groups] for g in range(n_groups)]
            t0 = time.monotonic()
            done = await asyncio.gather(*(loop.run_in_executor(ssd.pool, reader.read_slots, g)
                                          for g in groups))
            self._observe_read(sum(len(r[1]) for r in reads), time.monotonic() - t0)
            results = self._ungroup(done, len(reads))
            for (b, off, fut), r in zip(mine, results):
                if r is True:
                    if into_hbm:
                        hbm.adopt(b, off)
                        hbm.counters.bytes_in += store.block_bytes_of(b)
                    else:
                        idx.set_dram(b, off)
                        store.dram.promotions += 1
                    self.counters.promotions += 1
                    self.counters.hits += 1
                else:
                    if into_hbm:
                        hbm.filling.pop(b, None)
                        hbm.slabs.free(off)
                    else:
                        store.slabs.free(off)
                    if isinstance(r, BaseException):
                        ssd.counters.read_errors += 1
                        log.warning("SSD read of block %s failed (%s): treated as a miss",
                                    idx.key_of(b).hex()[:12], r)
                    else:
                        ssd.counters.checksum_failures += 1
                        log.warning("SSD block %s failed its checksum: dropped, never served",
                                    idx.key_of(b).hex()[:12])
                    store.discard(b)
        finally:
            for b, _, fut in mine:
                self._promoting.pop(b, None)
                if not fut.done():
                    fut.set_result(None)
            store.unpin([b for b, _, _ in mine])

    # -- shutdown and stats ----------------------------------------------------------------------
    async def close(self) -> None:
        """Flush write-back blocks, sync and compact the journal, close the files."""
        self._closed = True
        if self._cleaner is not None:
            await asyncio.gather(self._cleaner, return_exceptions=True)
        if self._write_tasks:
            await asyncio.gather(*self._write_tasks, return_exceptions=True)
        while self.journal._flush_task is not None:   # a flush or background compaction
            await asyncio.shield(self.journal._flush_task)
        idx = self.store.index
        if self.policy == "write_back":
            log.info("write-back: %d blocks written ahead of eviction by the cleaner, %d while "
                     "an eviction waited", self.ssd.counters.cleaned,
                     self.ssd.counters.sync_demotions)
            dirty = np.flatnonzero((idx.state == COMMITTED) & (idx.dram != NO_SLOT) &
                                   (idx.ssd == NO_SLOT)).tolist()
            if dirty:
                log.info("flushing %d write-back blocks to SSD", len(dirty))
                for i in range(0, len(dirty), 1024):
                    self.write_blocking(dirty[i:i + 1024])
        try:
            self.journal.flush_blocking()
            self.compact()
        finally:
            self.journal.close()
            self.ssd.close()

    def tier_blocks(self) -> int:
        """Blocks holding an SSD slot (kept as a running count: stats sample it every second)."""
        return self._live
