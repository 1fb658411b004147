"""The SSD tier's catalog: what is on SSD, as the journal records it — namespace records,
recovery at startup, compaction. The one owner of the journal.

    on_namespace(ns)   journal a namespace the first time it is seen (a restart restores it).
    log_puts(bids), log_segment(seg, size), log_delete(addr)
                       journal what the SSD tier and its space manager changed; ``live`` counts
                       the SSD slots holding a block (compaction threshold, tier stats).
    recover(register)  rebuild namespaces and the SSD part of the block table from the journal
                       (vectorized: millions of blocks per restart), then compact it. When the
                       journal is missing, empty or damaged, also scan the slab files' slot
                       headers and merge (newest sequence number wins per slot and per key).
    slot_tag(bid)      what a slot header carries besides key and checksum so that a scan can
                       rebuild the block's index entry and its namespace without the journal.
    compact()          rewrite the journal as the live records only (startup, shutdown, and in
                       the background once dead records outnumber live ones).
    sync_journal()     wait until every appended record is durable.

Built by the daemon's composition root with the block table, the slab files and the journal;
namespaces are registered through the ``register`` callable recover() is given (the store's
register_namespace), so the catalog never needs the store.
"""
from __future__ import annotations

import asyncio
import json
import logging
import struct
import time

import numpy as np

from kvstore.core.errors import KVStoreError
from kvstore.core.keys import KEY_BYTES
from kvstore.core.layout import KVLayout, LayoutError
from kvstore.tiers.base import COMMITTED, FREE, NO_SLOT
from kvstore.tiers.ssd import journal as jr
from kvstore.tiers.ssd.format import MAX_TAG_BYTES

# A slot tag: namespace digest, parent key (zeros: a chain root), depth, then the namespace
# record as JSON (model id, tenant, layout) — every slot carries enough to re-register its
# namespace. A record too long for the header (a model id of kilobytes) is left out: such a
# namespace is then recovered from the journal only.
_TAG = struct.Struct("<16s16sI")

log = logging.getLogger("kvstore.tiers.ssd.tier")

COMPACT_MIN_RECORDS = 65536   # never compact a journal smaller than this many dead records
COMPACT_CHUNK_BLOCKS = 65536  # block entries a background compaction builds per loop turn


class SSDCatalog:
    def __init__(self, table, files, journal: jr.Journal):
        """``table``: the block table (kvstore.store.table.BlockTable); ``files``: the open
        slab files (kvstore.tiers.ssd.files.SlabFiles); ``journal``: owned from here on."""
        self.table = table
        self.slabs = files
        self.journal = journal
        self._ns_ord: dict[bytes, int] = {}
        self._ns_tags: dict[bytes, bytes] = {}   # namespace -> its record in slot headers
        self._replaying = False
        self._sync_task: asyncio.Task | None = None
        self._closed = False
        self._register_fn = None   # recover()'s namespace registration
        self.loading = False       # a recovery is applying the journal
        # While loading: the journal as found is open for appending the puts written meanwhile
        # (open_load_writes); off again before the compaction that ends the load.
        self.load_writes = False
        self._next_ord = 0         # ordinal the next NS record appended while loading takes
        self._freed_while_compacting: list[int] | None = None   # see compact_in_steps
        self.live = 0     # SSD slots holding a block (deleted-but-pinned ones too)
        self._compaction: asyncio.Task | None = None   # a background compaction (maybe_compact)
        # While it builds its snapshot: the PUTS, DEL and SEG records appended meanwhile, to be
        # appended again behind the snapshot in the new file (None: not recording).
        self._appended_while_compacting: list[bytes] | None = None

    # -- journaling what changed -----------------------------------------------------------------
    def log_puts(self, bids: list[int]) -> None:
        """Blocks now on SSD (their ``ssd`` and ``csum`` set in the table): one PUTS frame.
        While loading, behind an NS record for each namespace the journal as found lacks."""
        if self.loading:
            self._journal_new_namespaces()
        self.live += len(bids)
        self._append(jr.encode_puts(self._put_entries(np.asarray(bids))))

    def log_segment(self, segment: int, slot_bytes: int, sync: bool = False) -> None:
        """A segment was given to a block size."""
        self._append(jr.encode_seg(segment, slot_bytes))
        if sync:
            self.schedule_sync()

    def log_delete(self, addr: int) -> None:
        """The block in SSD slot ``addr`` is gone."""
        self.live -= 1
        if self.loading:    # the compaction that ends the load leaves this block out
            if self._freed_while_compacting is not None:
                self._freed_while_compacting.append(addr)   # ... or journals its DEL then
            return
        self._append(jr.encode_del(addr, self.slabs.next_seq()))
        self.schedule_sync()

    def _append(self, record: bytes) -> None:
        self.journal.append(record)
        if self._appended_while_compacting is not None:
            self._appended_while_compacting.append(record)

    def open_load_writes(self) -> None:
        """While loading, after begin_restore: open the journal as found for appending, so a
        block written during the load is durable when its commit answers. Its records name
        namespaces by the file's own ordinals (those begin_restore took from it; others get
        NS records as their blocks are journaled). Raises OSError."""
        self.journal.open_append(header=self.slabs.created)
        self.load_writes = True

    def _journal_new_namespaces(self) -> None:
        for ns in self.table.namespaces():
            if ns.namespace_id not in self._ns_ord:
                self._ns_ord[ns.namespace_id] = self._next_ord
                self._next_ord += 1
                self.journal.append(jr.encode_ns(self._ns_record(ns)))

    # -- namespaces ----------------------------------------------------------------------------
    def on_namespace(self, ns) -> None:
        if self._replaying or self.loading or ns.namespace_id in self._ns_ord:
            return      # while loading: the compaction that ends the load records it
        self._ns_ord[ns.namespace_id] = len(self._ns_ord)
        self.journal.append(jr.encode_ns(self._ns_record(ns)))
        self.schedule_sync()

    def slot_tag(self, bid: int) -> bytes:
        idx = self.table
        ns = idx.namespace_of(bid)
        meta = self._ns_tags.get(ns.namespace_id)
        if meta is None:
            rec = self._ns_record(ns)
            meta = json.dumps({"model_id": rec.model_id, "tenant": rec.tenant,
                               "layout": rec.layout}, separators=(",", ":")).encode()
            if len(meta) > MAX_TAG_BYTES - _TAG.size:
                meta = b""
            self._ns_tags[ns.namespace_id] = meta
        p = int(idx.parent[bid])
        parent = idx.key_of(p) if p >= 0 else bytes(KEY_BYTES)
        return _TAG.pack(ns.namespace_id, parent, int(idx.depth[bid])) + meta

    @staticmethod
    def _ns_record(ns) -> jr.NamespaceRecord:
        l = ns.layout
        return jr.NamespaceRecord(ns.namespace_id, ns.model_id, ns.tenant, {
            "num_layers": l.num_layers, "num_kv_heads": l.num_kv_heads, "head_dim": l.head_dim,
            "block_tokens": l.block_tokens, "dtype": l.dtype, "tp_rank": l.tp_rank,
            "tp_size": l.tp_size, **({"quant": l.quant} if l.quant else {})})

    # -- recovery and compaction ---------------------------------------------------------------
    # Recovery runs in four steps so that a daemon can serve while it loads (the tier drives
    # them, kvstore.tiers.ssd.tier.SSDTier.recover_in_background); recover() runs them blocking.
    #   read_journal()      off the loop: replay the journal (and scan the slab files when it is
    #                       damaged); touches no block state
    #   begin_restore()     on the loop: register namespaces, assign segments, merge a scan
    #   order_restore()     off the loop: newest entry per key, sorted (namespace, depth) so
    #                       parents land before their children; pure numpy
    #   restore_batch()     on the loop, a bounded batch at a time; then finish_restore()
    # While ``loading`` only the blocks written meanwhile are journaled, appended to the file as
    # found (open_load_writes: a write-through commit is durable when it answers); deletes are
    # covered by the compaction that ends the load, which writes only what the table holds.
    def recover(self, register) -> int:
        """Rebuild namespaces and SSD blocks from the journal — and, when the journal is
        missing, empty or damaged in an existing directory, from the slab files' slot headers
        too — then compact the journal, blocking. Returns blocks recovered. ``register(model_id,
        layout, tenant)`` registers a namespace (the store's register_namespace)."""
        t0 = time.monotonic()
        read = self.read_journal()
        by_ns, puts = self.begin_restore(*read, register)
        plan = self.order_restore(puts, self.valid_slot_bytes(by_ns))
        self.table.reserve(len(plan))
        for ns, recs in self.batches(by_ns, plan, len(plan) or 1):
            self.restore_batch(ns, recs)
        self.finish_restore(read[0], read[2], by_ns, time.monotonic() - t0)
        self.loading = False
        self.compact()
        return self.live

    def read_journal(self):
        """Replay the journal and, when it cannot be trusted in an existing directory, scan the
        slab files' slot headers (which assigns the segments it finds). No block state is
        touched: safe off the event loop. Returns (journal state, scanned slots, scan figures
        or None)."""
        st = self.journal.replay()
        scanned, figures = [], None
        if st.damaged and not self.slabs.created:
            why = ("missing" if not st.exists else "empty" if not st.records and not
                   st.truncated_bytes else f"damaged: {st.truncated_bytes} bytes in "
                   f"{st.damaged_regions} region(s) skipped" if st.truncated_bytes else
                   "without its header frame")
            log.warning("SSD journal %s is %s: rebuilding the index from the slab files' slot "
                        "headers too", self.journal.path, why)
            scanned, figures = self.slabs.scan(st.segments)
        return st, scanned, figures

    def begin_restore(self, st, scanned, figures, register) -> tuple[list, np.ndarray]:
        """On the loop: register the recovered namespaces and assign the segments; returns
        (namespace per journal ordinal, None where refused; the live PUT entries)."""
        ssd = self.slabs
        self.loading = True
        self._register_fn = register
        by_ns = [self._register(rec, "journal") for rec in st.namespaces]
        # The file's ordinals, for what is appended to it while loading (open_load_writes).
        self._ns_ord = {}
        for i, rec in enumerate(st.namespaces):
            self._ns_ord.setdefault(rec.namespace_id, i)
        self._next_ord = len(st.namespaces)
        for seg, slot_bytes in st.segments.items():
            if not ssd.assign_segment(seg, slot_bytes):
                log.warning("journal: segment %d is outside the configured capacity or was "
                            "re-cut; its journaled blocks are dropped", seg)
        puts = st.puts
        if figures is not None:
            puts = self._merge(st, self._scanned_entries(scanned, by_ns))
        if len(puts):
            ssd.observe_seq(int(puts["seq"].max()))
        if st.deleted:
            ssd.observe_seq(max(st.deleted.values()))
        ssd.counters.recovered_blocks = 0
        return by_ns, puts

    def valid_slot_bytes(self, by_ns: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """What order_restore checks addresses against: slot bytes per namespace ordinal (0:
        refused), and per segment its slot bytes and slot count (one past the end: 0)."""
        segs = self.slabs.segments
        return (np.array([ns.layout.slot_bytes if ns is not None else 0 for ns in by_ns] + [0],
                         dtype=np.int64),
                np.array([s.slot_bytes for s in segs] + [0], dtype=np.int64),
                np.array([len(s.owner) for s in segs] + [0], dtype=np.int64))

    @staticmethod
    def order_restore(puts: np.ndarray, valid) -> np.ndarray:
        """The entries to restore: per (namespace, key) the newest (highest sequence number;
        an invalid newest one still shadows older ones, as before), those whose slot fits
        their namespace's block size, sorted by (namespace, depth). Pure numpy: safe off the
        event loop, and the sorts release the GIL."""
        ns_slot, seg_slot_bytes, seg_slots = valid
        if not len(puts):
            return puts
        # Plain columns, one index permutation, one gather of the records at the end: fancy
        # indexing of the structured array itself costs seconds per million entries.
        ns = np.ascontiguousarray(puts["ns"]).astype(np.int64)
        k0 = np.ascontiguousarray(puts["key"][:, 0])
        k1 = np.ascontiguousarray(puts["key"][:, 1])
        # Keys are BLAKE2b digests: equal first words mean (almost always) one key journaled
        # twice. Sort by that word alone; only such runs get the full (namespace, key, newest
        # first) order, of which the first entry per key is kept.
        o = np.argsort(k0, kind="stable")
        s0 = k0[o]
        same = np.zeros(len(o), dtype=bool)
        same[1:] = s0[1:] == s0[:-1]
        same[:-1] |= same[1:]
        if same.any():
            sub = o[same]
            sub = sub[np.lexsort((~np.ascontiguousarray(puts["seq"])[sub], k1[sub], k0[sub],
                                  ns[sub]))]
            first = np.ones(len(sub), dtype=bool)
            first[1:] = ((ns[sub][1:] != ns[sub][:-1]) | (k0[sub][1:] != k0[sub][:-1]) |
                         (k1[sub][1:] != k1[sub][:-1]))
            o = np.concatenate([o[~same], sub[first]])
        addrs = np.ascontiguousarray(puts["addr"])[o]
        seg_no = np.minimum(addrs >> 32, len(seg_slots) - 1)
        ns_ord = np.minimum(ns[o], len(ns_slot) - 1)
        ok = ((ns_slot[ns_ord] > 0) & (seg_slot_bytes[seg_no] == ns_slot[ns_ord]) &
              ((addrs & 0xFFFFFFFF) < seg_slots[seg_no]) & (addrs >= 0))
        o = o[ok]
        depth = np.ascontiguousarray(puts["depth"])[o].astype(np.int64)
        return puts[o[np.argsort((ns[o] << 32) | depth, kind="stable")]]

    @staticmethod
    def batches(by_ns: list, plan: np.ndarray, batch_blocks: int):
        """(namespace, entries) of at most ``batch_blocks`` entries each, in plan order."""
        if not len(plan):
            return
        cuts = np.flatnonzero(plan["ns"][1:] != plan["ns"][:-1]) + 1
        for part in np.split(plan, cuts):
            ns = by_ns[int(part["ns"][0])]
            for i in range(0, len(part), batch_blocks):
                yield ns, part[i:i + batch_blocks]

    def restore_batch(self, ns, recs: np.ndarray, skip=None) -> int:
        """Index a batch of one namespace's entries (on the loop). A key the table already
        holds is skipped — a put during the load (newer than any journaled copy) or a block
        restored already; so is one for which ``skip(ns, keys)`` (a bool mask, or None: none) says so: deleted
        while loading. A skipped entry's slot stays ownerless (free once finished). Returns
        blocks restored."""
        idx, ssd = self.table, self.slabs
        keys = np.ascontiguousarray(recs["key"])
        ok = idx.find_many(ns.index, keys.tobytes()) < 0
        gone = skip(ns, keys) if skip is not None else None
        if gone is not None:
            ok &= ~gone
        sel = np.flatnonzero(ok)
        if not len(sel):
            return 0
        addrs = recs["addr"][sel]
        ssd.set_seq(addrs, recs["seq"][sel])
        bids = idx.restore_many(ns.index, keys[sel].tobytes(), addrs, recs["csum"][sel],
                                recs["depth"][sel], recs["parent"][sel], mirror=False)
        ssd.set_owners(addrs, bids)
        self.live += len(sel)
        self.slabs.counters.recovered_blocks += len(sel)
        return len(sel)

    def finish_restore(self, st, figures, by_ns, seconds: float) -> None:
        """On the loop, after the last batch: free lists, the lookup mirror, the log line; the
        caller then compacts (compact(), or compact_in_steps() while serving)."""
        ssd = self.slabs
        ssd.rebuild_free_lists()
        if self.table.has_mirror():
            self.table.resync_mirror()
        n = ssd.counters.recovered_blocks
        if figures is not None:
            log.warning("SSD tier: recovered %d blocks, %d namespaces: %d journal frames "
                        "replayed (%d live block entries), %d damaged regions skipped; slab "
                        "scan read %d slot headers in %d segments in %.2fs, found %d intact "
                        "slots", n, sum(1 for x in by_ns if x is not None), st.records,
                        len(st.puts), st.damaged_regions, figures["headers_read"],
                        figures["segments"], figures["seconds"], figures["slots_found"])
        elif n or st.records:
            log.info("SSD tier: recovered %d blocks, %d namespaces from %d journal records "
                     "in %.2fs", n, len(st.namespaces), st.records, seconds)

    async def compact_in_steps(self, chunk_blocks: int) -> None:
        """The compaction that ends a background load, without stalling the event loop: the
        snapshot's block entries are built ``chunk_blocks`` at a time, a loop turn apart, while
        still ``loading`` (nothing journaled, no SSD writes: blocks can only go). A slot freed
        meanwhile is remembered and journaled as a DEL right behind the new file's snapshot,
        so a block deleted after its chunk was taken stays deleted. Returns once the new
        journal is durable; ``loading`` is off from when its snapshot is complete."""
        idx = self.table
        self._freed_while_compacting = []
        live = np.flatnonzero((idx.ssd != NO_SLOT) & (idx.state == COMMITTED))
        parts = []
        try:
            for i in range(0, len(live), max(1, chunk_blocks)):
                ids = live[i:i + chunk_blocks]
                ids = ids[(idx.ssd[ids] != NO_SLOT) & (idx.state[ids] == COMMITTED)]
                self._number_namespaces()
                parts.append(self._put_entries(ids))
                await asyncio.sleep(0)
            records = self._head_records() + parts
            self.live = int(np.count_nonzero((idx.ssd != NO_SLOT) & (idx.state != FREE)))
            freed = self._freed_while_compacting
        finally:
            self._freed_while_compacting = None
        self.loading = False
        self.load_writes = False
        done = self.journal.start_rewrite(records)
        for addr in freed:
            self.journal.append(jr.encode_del(addr, self.slabs.next_seq()))
        await done

    def _register(self, rec: jr.NamespaceRecord, source: str):
        """Register a recovered namespace (not journaled again); None if refused. One from a
        slot header must have the digest its blocks were written under."""
        self._replaying = True
        try:
            ns = self._register_fn(rec.model_id, KVLayout(**rec.layout), rec.tenant)
        except (KVStoreError, LayoutError, TypeError) as exc:
            log.warning("%s: namespace %r not restored: %s", source, rec.model_id, exc)
            return None
        finally:
            self._replaying = False
        if source != "journal" and ns.namespace_id != rec.namespace_id:
            log.warning("%s: namespace %r has another digest now; its blocks are dropped",
                        source, rec.model_id)
            return None
        return ns

    def _scanned_entries(self, scanned, by_ns: list) -> np.ndarray:
        """PUT entries of the slots a scan found; namespaces not known yet are registered from
        the slot headers (appended to ``by_ns``)."""
        ords = {ns.namespace_id: i for i, ns in enumerate(by_ns) if ns is not None}
        e = np.zeros(len(scanned), dtype=jr.PUT_DTYPE)
        keep = np.zeros(len(scanned), dtype=bool)
        for i, s in enumerate(scanned):
            if len(s.tag) < _TAG.size:
                continue
            digest, parent, depth = _TAG.unpack_from(s.tag, 0)
            if digest not in ords:
                ords[digest] = -1
                meta = s.tag[_TAG.size:]
                if meta:
                    try:
                        m = json.loads(meta)
                        ns = self._register(jr.NamespaceRecord(
                            digest, m["model_id"], m["tenant"], m["layout"]), "slot header")
                    except (ValueError, KeyError, TypeError):
                        ns = None
                    if ns is not None:
                        ords[digest] = len(by_ns)
                        by_ns.append(ns)
                        log.info("slot header: namespace %r (tenant %r) re-registered",
                                 ns.model_id, ns.tenant)
            if ords[digest] < 0:
                continue
            e[i] = (ords[digest], np.frombuffer(s.key, dtype="<u8"),
                    np.frombuffer(parent, dtype="<u8"), depth, s.addr, s.csum, s.seq)
            keep[i] = True
        return e[keep]

    @staticmethod
    def _merge(st: jr.JournalState, scanned: np.ndarray) -> np.ndarray:
        """Per slot, the newest of: the journal's last PUT, its last DEL, the slot's verified
        header (a tie between PUT and header is one write: the header is taken). A DEL newest
        frees the slot."""
        puts = st.puts
        d_addr = np.fromiter(st.deleted.keys(), dtype=np.int64, count=len(st.deleted))
        d_seq = np.fromiter(st.deleted.values(), dtype=np.uint64, count=len(st.deleted))
        cand = np.concatenate([puts, scanned])
        addr = np.concatenate([cand["addr"], d_addr])
        seq = np.concatenate([cand["seq"], d_seq])
        kind = np.concatenate([np.full(len(puts), 1), np.full(len(scanned), 2),
                               np.zeros(len(d_addr), dtype=np.int64)])
        which = np.concatenate([np.arange(len(cand)), np.full(len(d_addr), -1)])
        order = np.lexsort((kind, seq, addr))
        last = np.ones(len(order), dtype=bool)
        last[:-1] = addr[order][1:] != addr[order][:-1]
        win = which[order][last]
        return cand[win[win >= 0]]

    def compact(self) -> None:
        """Rewrite the journal as the live records only, blocking (startup and shutdown)."""
        self.journal.replace_blocking(self._snapshot())

    def compacting(self) -> bool:
        """compact_in_steps is building its snapshot."""
        return self._freed_while_compacting is not None

    def _number_namespaces(self) -> None:
        """Journal ordinals of the namespaces: their table order (append-only, so ordinals
        taken earlier stay valid)."""
        self._ns_ord = {ns.namespace_id: i for i, ns in enumerate(self.table.namespaces())}

    def _head_records(self) -> list:
        """A compacted journal's first records: every namespace (renumbered), every segment."""
        self._number_namespaces()
        records = [jr.encode_ns(self._ns_record(ns)) for ns in self.table.namespaces()]
        records += [jr.encode_seg(seg.number, seg.slot_bytes) for seg in self.slabs.segments
                    if seg.slot_bytes]
        return records

    def _snapshot(self) -> list:
        """The live journal: namespaces (renumbered), segments, and every SSD block."""
        idx = self.table
        records = self._head_records()
        live = np.flatnonzero((idx.ssd != NO_SLOT) & (idx.state == COMMITTED))
        records.append(self._put_entries(live))    # encoded by the writer, off the loop
        # SSD slots holding a block (deleted-but-leased ones too: forget_ssd counts them down
        # when they go); kept current by log_puts and log_delete.
        self.live = int(np.count_nonzero((idx.ssd != NO_SLOT) & (idx.state != FREE)))
        return records

    def maybe_compact(self) -> None:
        """While running: compact in the background once dead records outnumber live ones
        (_compact_in_background: nothing of it blocks the event loop for long)."""
        j = self.journal
        if not self._closed and not self.loading and self._compaction is None and \
                j.records_in_file > 2 * self.live + COMPACT_MIN_RECORDS:
            self._compaction = asyncio.get_running_loop().create_task(
                self._compact_in_background(COMPACT_CHUNK_BLOCKS))

    async def _compact_in_background(self, chunk_blocks: int) -> None:
        """Rewrite the journal as the live records while the daemon serves: the snapshot's
        block entries are built ``chunk_blocks`` at a time, a loop turn apart, while writes
        and deletes go on and are journaled (and synced) in the old file as usual. Every PUTS,
        DEL and SEG record appended meanwhile is written again behind the snapshot in the new
        file, in its order, so a block written or deleted after its chunk was taken is
        journaled right (a slot's last record wins on replay). The new file is swapped in by
        the journal's writer (off the loop); failures are logged and leave the old journal."""
        idx = self.table
        self._appended_while_compacting = []
        try:
            live = np.flatnonzero((idx.ssd != NO_SLOT) & (idx.state == COMMITTED))
            parts = []
            for i in range(0, len(live), max(1, chunk_blocks)):
                ids = live[i:i + chunk_blocks]
                ids = ids[(idx.ssd[ids] != NO_SLOT) & (idx.state[ids] == COMMITTED)]
                parts.append(self._put_entries(ids))
                await asyncio.sleep(0)
            # Everything appended so far durable in the old file, no flush in flight: what
            # start_rewrite needs, and no waiter is told "durable" by the rewrite for a record
            # the new file lacks.
            while self.journal.busy() or self.journal.pending():
                await self.journal.sync()
            if self._closed:
                return                       # shutdown compacts once more itself
            # From here to start_rewrite nothing awaits. The records kept meanwhile are written
            # inside the new file (not appended after it), so the rename never drops one.
            again, self._appended_while_compacting = self._appended_while_compacting, None
            records = self._head_records() + parts + again
            self.live = int(np.count_nonzero((idx.ssd != NO_SLOT) & (idx.state != FREE)))
            await self.journal.start_rewrite(records)
        except Exception:
            log.exception("SSD journal: background compaction failed; the old journal stays")
        finally:
            self._appended_while_compacting = None
            self._compaction = None

    async def idle(self) -> None:
        """Wait for a background compaction to finish (shutdown)."""
        if self._compaction is not None:
            await asyncio.gather(self._compaction, return_exceptions=True)

    def _put_entries(self, bids: np.ndarray) -> np.ndarray:
        idx = self.table
        bids = np.asarray(bids, dtype=np.int64)
        ords = np.array([self._ns_ord[ns.namespace_id] for ns in idx.namespaces()] or [0],
                        dtype=np.uint32)
        e = np.zeros(len(bids), dtype=jr.PUT_DTYPE)
        e["ns"] = ords[idx.ns[bids]]
        e["key"] = idx.keys[bids]
        p = idx.parent[bids].astype(np.int64)
        e["parent"] = np.where((p >= 0)[:, None], idx.keys[np.maximum(p, 0)], 0)
        e["depth"] = idx.depth[bids]
        e["addr"] = idx.ssd[bids]
        e["csum"] = idx.csum[bids]
        e["seq"] = self.slabs.seq_of(e["addr"])
        return e

    async def sync_journal(self) -> None:
        """Wait until every journal record appended so far is durable (errors are logged)."""
        try:
            while self.journal.pending():   # records may arrive while a flush is running
                await self.journal.sync()
        except OSError as exc:
            log.warning("SSD journal sync failed: %s", exc)
        self.maybe_compact()

    def close(self) -> None:
        """No more background compaction (shutdown: the tier compacts once more itself)."""
        self._closed = True

    def schedule_sync(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._sync_task is None or self._sync_task.done():
            self._sync_task = loop.create_task(self.sync_journal())
