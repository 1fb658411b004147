"""Recovery of the SSD catalog at start-up: namespaces and blocks back from the journal, and
from the slab files' slot headers when the journal is missing, empty or damaged.

Recovery runs in four steps so that a daemon can serve while it loads (the tier drives
them, kvstore.tiers.ssd.tier.SSDTier.recover_in_background); recover() runs them blocking.
  read_journal()      off the loop: replay the journal (and scan the slab files when it is
                      damaged); touches no block state
  begin_restore()     on the loop: register namespaces, assign segments, merge a scan
  order_restore()     off the loop: newest entry per key, sorted (namespace, depth) so
                      parents land before their children; pure numpy
  restore_batch()     on the loop, a bounded batch at a time; then finish_restore()
While ``loading`` only the blocks written meanwhile are journaled, appended to the file as
found (open_load_writes: a write-through commit is durable when it answers); deletes are
covered by the compaction that ends the load, which writes only what the table holds.

A base of kvstore.tiers.ssd.catalog.SSDCatalog (the catalog's state: table, slab files,
journal, namespace ordinals, ``live``, ``loading``).
"""
from __future__ import annotations

import json
import logging
import struct
import time

import numpy as np

from kvstore.core.errors import KVStoreError
from kvstore.core.layout import KVLayout, LayoutError
from kvstore.tiers.ssd import journal as jr

# A slot tag: namespace digest, parent key (zeros: a chain root), depth, then the namespace
# record as JSON (model id, tenant, layout) — every slot carries enough to re-register its
# namespace. A record too long for the header (a model id of kilobytes) is left out: such a
# namespace is then recovered from the journal only. Written by SSDCatalog.slot_tag.
SLOT_TAG = struct.Struct("<16s16sI")

log = logging.getLogger("kvstore.tiers.ssd.tier")


class Recovery:
    """The recovery steps of SSDCatalog."""

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
            if len(s.tag) < SLOT_TAG.size:
                continue
            digest, parent, depth = SLOT_TAG.unpack_from(s.tag, 0)
            if digest not in ords:
                ords[digest] = -1
                meta = s.tag[SLOT_TAG.size:]
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
