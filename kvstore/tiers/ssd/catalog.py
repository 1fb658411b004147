"""The SSD tier's catalog: what is on SSD, as the journal records it. The one owner of the
journal; its recovery steps are kvstore.tiers.ssd.recovery, its compactions
kvstore.tiers.ssd.compaction (bases of SSDCatalog, sharing its state).

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
                       the background once dead records outnumber live ones: maybe_compact).
    sync_journal()     wait until every appended record is durable.

Built by the daemon's composition root with the block table, the slab files and the journal;
namespaces are registered through the ``register`` callable recover() is given (the store's
register_namespace), so the catalog never needs the store.
"""
from __future__ import annotations

import asyncio
import json
import logging

import numpy as np

from kvstore.core.keys import KEY_BYTES
from kvstore.tiers.ssd import journal as jr
from kvstore.tiers.ssd.compaction import Compaction
from kvstore.tiers.ssd.format import MAX_TAG_BYTES
from kvstore.tiers.ssd.recovery import SLOT_TAG, Recovery

log = logging.getLogger("kvstore.tiers.ssd.tier")


class SSDCatalog(Recovery, Compaction):
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
            if len(meta) > MAX_TAG_BYTES - SLOT_TAG.size:
                meta = b""
            self._ns_tags[ns.namespace_id] = meta
        p = int(idx.parent[bid])
        parent = idx.key_of(p) if p >= 0 else bytes(KEY_BYTES)
        return SLOT_TAG.pack(ns.namespace_id, parent, int(idx.depth[bid])) + meta

    @staticmethod
    def _ns_record(ns) -> jr.NamespaceRecord:
        l = ns.layout
        return jr.NamespaceRecord(ns.namespace_id, ns.model_id, ns.tenant, {
            "num_layers": l.num_layers, "num_kv_heads": l.num_kv_heads, "head_dim": l.head_dim,
            "block_tokens": l.block_tokens, "dtype": l.dtype, "tp_rank": l.tp_rank,
            "tp_size": l.tp_size, **({"quant": l.quant} if l.quant else {})})

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
