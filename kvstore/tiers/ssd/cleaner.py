"""The write-back cleaner: keeps the next DRAM eviction victims clean, in the background.

With the write_back policy a committed block is written to SSD only when DRAM must evict it.
Waiting for that write at eviction time would put SSD latency on the put or get that needs the
room, so this task writes the coldest dirty blocks ahead of time: while fewer than 1/8 of a
size class's unleased DRAM blocks have an SSD copy (free slots count too), it writes the next
victims in eviction order, CLEAN_BATCH at a time. Eviction then finds clean victims and demotes
them without waiting; the eviction plan (BlockStore.clean_room) writes the rest when the cleaner
fell behind. Blocks that die young in DRAM are never written.

Owned by the SSD tier (kvstore.tiers.ssd.tier.SSDTier), which hands it the block table, the DRAM
tier (read only: headroom and eviction order), its own pinned-write coroutine and I/O counters.
"""
from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

from kvstore.tiers.base import NO_SLOT

CLEAN_BATCH = 64


class WriteBackCleaner:
    def __init__(self, table, dram, write_pinned: Callable[[list[int]], Awaitable[None]],
                 counters, running: Callable[[], bool]):
        """``write_pinned(bids)``: write these pinned DRAM blocks to SSD, journal them and unpin
        them (SSDTier._persist_pinned); ``counters``: the SSD I/O counters (``cleaned``);
        ``running()``: whether the tier may write now (not closed, loaded, not failed)."""
        self.table = table
        self.dram = dram
        self._write = write_pinned
        self._counters = counters
        self._running = running
        self._task: asyncio.Task | None = None

    def kick(self) -> None:
        """Start a cleaning pass unless one runs (cheap: called after every commit)."""
        if self._running() and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._clean())

    async def wait(self) -> None:
        """Wait for the pass in progress, if any (shutdown)."""
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    async def _clean(self) -> None:
        idx = self.table
        capacity = self.dram.capacity_bytes()
        while self._running():
            todo = []
            for slot_bytes, free_slots, ev in self.dram.headroom():
                headroom = free_slots + int((idx.ssd[ev] != NO_SLOT).sum())
                if headroom >= max(1, capacity // slot_bytes // 8):
                    continue
                dirty = ev[idx.ssd[ev] == NO_SLOT]
                todo += self.dram.eviction_order(dirty)[:CLEAN_BATCH].tolist()
            if not todo:
                return
            idx.pin(todo)
            await asyncio.shield(self._write(todo))       # unpins
            self._counters.cleaned += sum(1 for b in todo if idx.ssd[b] != NO_SLOT)
            if all(idx.ssd[b] == NO_SLOT for b in todo):
                return   # nothing could be written (disk full, I/O errors): stop, retry later
