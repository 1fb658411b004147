"""Compaction of the SSD journal: rewrite it as the live records only.

Three occasions, one snapshot (namespaces renumbered, segments, every SSD block):
    compact()                 blocking: at the end of a blocking recovery and at shutdown;
    compact_in_steps()        the end of a background load: built a chunk per loop turn while
                              still ``loading``; slots freed meanwhile follow as DEL records;
    maybe_compact()           while serving, once dead records outnumber live ones: built a
                              chunk per loop turn while writes and deletes go on and are
                              journaled in the old file; every record appended meanwhile is
                              written again behind the snapshot in the new file.
The new file replaces the old one atomically (kvstore.tiers.ssd.journal.Journal.rewrite), so
no acknowledged block is ever missing from the journal on disk.

A base of kvstore.tiers.ssd.catalog.SSDCatalog (the catalog's state: table, slab files,
journal, namespace ordinals, ``live``, ``loading``).
"""
from __future__ import annotations

import asyncio
import logging

import numpy as np

from kvstore.tiers.base import COMMITTED, FREE, NO_SLOT
from kvstore.tiers.ssd import journal as jr

log = logging.getLogger("kvstore.tiers.ssd.tier")

COMPACT_MIN_RECORDS = 65536   # never compact a journal smaller than this many dead records
COMPACT_CHUNK_BLOCKS = 65536  # block entries a background compaction builds per loop turn


class Compaction:
    """The journal compactions of SSDCatalog."""

    def compact(self) -> None:
        """Rewrite the journal as the live records only, blocking (startup and shutdown)."""
        self.journal.replace_blocking(self._snapshot())

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
