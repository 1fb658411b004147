"""The SSD tier's journal side of Tiering: namespace records, recovery at startup, compaction.

    on_namespace(ns)   journal a namespace the first time it is seen (a restart restores it).
    recover()          rebuild namespaces and the SSD part of the index from the journal
                       (vectorized: millions of blocks per restart), then compact it.
    compact()          rewrite the journal as the live records only (startup, shutdown, and in
                       the background once dead records outnumber live ones).
    sync_journal()     wait until every appended record is durable.

A mixin of kvstore.tiering.Tiering: it uses the store, ssd, journal and counters Tiering holds.
"""
from __future__ import annotations

import asyncio
import logging

import numpy as np

from kvstore.errors import KVStoreError
from kvstore.index import COMMITTED, FREE, NO_SLOT
from kvstore.layout import KVLayout, LayoutError
from kvstore.tiers import journal as jr

log = logging.getLogger("kvstore.tiering")

COMPACT_MIN_RECORDS = 65536   # never compact a journal smaller than this many dead records


class SSDJournaling:
    # -- namespaces ----------------------------------------------------------------------------
    def on_namespace(self, ns) -> None:
        if self._replaying or ns.namespace_id in self._ns_ord:
            return
        self._ns_ord[ns.namespace_id] = len(self._ns_ord)
        self.journal.append(jr.encode_ns(self._ns_record(ns)))
        self._schedule_sync()

    @staticmethod
    def _ns_record(ns) -> jr.NamespaceRecord:
        l = ns.layout
        return jr.NamespaceRecord(ns.namespace_id, ns.model_id, ns.tenant, {
            "num_layers": l.num_layers, "num_kv_heads": l.num_kv_heads, "head_dim": l.head_dim,
            "block_tokens": l.block_tokens, "dtype": l.dtype, "tp_rank": l.tp_rank,
            "tp_size": l.tp_size, **({"quant": l.quant} if l.quant else {})})

    # -- recovery and compaction ---------------------------------------------------------------
    def recover(self) -> int:
        """Rebuild namespaces and SSD blocks from the journal, then compact it. Returns blocks."""
        st = self.journal.replay()
        store, ssd = self.store, self.ssd
        self._replaying = True
        try:
            by_ns = []
            for rec in st.namespaces:
                try:
                    ns = store.register_namespace(rec.model_id, KVLayout(**rec.layout), rec.tenant)
                except (KVStoreError, LayoutError, TypeError) as exc:
                    log.warning("journal: namespace %r not restored: %s", rec.model_id, exc)
                    ns = None
                by_ns.append(ns)
        finally:
            self._replaying = False
        for seg, slot_bytes in st.segments.items():
            if not ssd.assign_segment(seg, slot_bytes):
                log.warning("journal: segment %d is outside the configured capacity; its blocks "
                            "are dropped", seg)
        for ns_ord, ns in enumerate(by_ns):
            if ns is not None:
                self._restore(ns, st.puts[st.puts["ns"] == ns_ord])
        ssd.rebuild_free_lists()
        self.compact()                  # also counts the live blocks
        n = self.ssd.counters.recovered_blocks = self._live
        if n or st.records:
            log.info("SSD tier: recovered %d blocks, %d namespaces from %d journal records",
                     n, len(st.namespaces), st.records)
        return n

    def _restore(self, ns, recs: np.ndarray) -> None:
        """Index one namespace's journaled blocks at once (vectorized: millions per restart)."""
        idx, ssd = self.store.index, self.ssd
        addrs = recs["addr"]
        seg_no = np.minimum(addrs >> 32, len(ssd.segments))
        slot = addrs & 0xFFFFFFFF
        seg_slot_bytes = np.array([s.slot_bytes for s in ssd.segments] + [0], dtype=np.int64)
        seg_slots = np.array([len(s.owner) for s in ssd.segments] + [0], dtype=np.int64)
        ok = (seg_slot_bytes[seg_no] == ns.layout.slot_bytes) & (slot < seg_slots[seg_no])
        keys = np.ascontiguousarray(recs["key"])
        _, first = np.unique(keys, axis=0, return_index=True)
        uniq = np.zeros(len(recs), dtype=bool)
        uniq[first] = True
        ok &= uniq & (idx.find_many(ns.index, keys.tobytes()) < 0)
        sel = np.flatnonzero(ok)
        if not len(sel):
            return
        bids = idx.add_many(ns.index, keys[sel].tobytes(), np.full(len(sel), -1), 0)
        idx.state[bids] = COMMITTED
        idx.ssd[bids] = addrs[sel]
        idx.csum[bids] = recs["csum"][sel]
        idx.depth[bids] = recs["depth"][sel]
        for n in np.unique(seg_no[sel]).tolist():
            in_seg = seg_no[sel] == n
            ssd.segments[n].owner[slot[sel][in_seg]] = bids[in_seg]
        parent_keys = np.ascontiguousarray(recs["parent"][sel])
        parents = idx.find_many(ns.index, parent_keys.tobytes())
        has = (parents >= 0) & parent_keys.any(axis=1)
        idx.parent[bids[has]] = parents[has]
        np.add.at(idx.children, parents[has], 1)

    def compact(self) -> None:
        """Rewrite the journal as the live records only, blocking (startup and shutdown)."""
        records = self._snapshot()
        self.journal._buf.clear()
        self.journal._durable = self.journal._appended
        self.journal.rewrite(records)

    def _snapshot(self) -> list:
        """The live journal: namespaces (renumbered), segments, and every SSD block."""
        store, idx = self.store, self.store.index
        records = []
        self._ns_ord = {}
        for ns in store._ns_by_index:
            self._ns_ord[ns.namespace_id] = len(self._ns_ord)
            records.append(jr.encode_ns(self._ns_record(ns)))
        for seg in self.ssd.segments:
            if seg.slot_bytes:
                records.append(jr.encode_seg(seg.number, seg.slot_bytes))
        live = np.flatnonzero((idx.ssd != NO_SLOT) & (idx.state == COMMITTED))
        records.append(self._put_entries(live))    # encoded by the writer, off the loop
        # SSD slots holding a block (deleted-but-leased ones too: forget_ssd counts them down
        # when they go); kept current by _finish_writes and forget_ssd.
        self._live = int(np.count_nonzero((idx.ssd != NO_SLOT) & (idx.state != FREE)))
        return records

    def _maybe_compact(self) -> None:
        """While running: compact in the background once dead records outnumber live ones."""
        j = self.journal
        if not self._closed and j.records_in_file > 2 * self._live + COMPACT_MIN_RECORDS and \
                j._flush_task is None:
            j.start_rewrite(self._snapshot())

    def _put_entries(self, bids: np.ndarray) -> np.ndarray:
        idx = self.store.index
        bids = np.asarray(bids, dtype=np.int64)
        ords = np.array([self._ns_ord[ns.namespace_id] for ns in self.store._ns_by_index] or [0],
                        dtype=np.uint32)
        e = np.zeros(len(bids), dtype=jr.PUT_DTYPE)
        e["ns"] = ords[idx.ns[bids]]
        e["key"] = idx.keys[bids]
        p = idx.parent[bids].astype(np.int64)
        e["parent"] = np.where((p >= 0)[:, None], idx.keys[np.maximum(p, 0)], 0)
        e["depth"] = idx.depth[bids]
        e["addr"] = idx.ssd[bids]
        e["csum"] = idx.csum[bids]
        return e

    async def sync_journal(self) -> None:
        """Wait until every journal record appended so far is durable (errors are logged)."""
        try:
            while self.journal.pending():   # records may arrive while a flush is running
                await self.journal.sync()
        except OSError as exc:
            log.warning("SSD journal sync failed: %s", exc)
        self._maybe_compact()

    def _schedule_sync(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._sync_task is None or self._sync_task.done():
            self._sync_task = loop.create_task(self.sync_journal())
