"""Whole-slot SSD reads through io_uring, issued and completed on the event loop's thread.

    reader = RingReads.open(files, loop)      # None where no ring can be set up
    results = await reader.read_slots(reads)  # what SlotIO.read_slots answers, per slot
    reader.close()                            # once no read is in flight

A promotion's reads through the thread pool cost a hand-off to a pool thread per group and one
back, and every pool thread takes the interpreter's lock for its Python steps; on a busy daemon
those context switches and lock waits cost more CPU than the reads themselves. Here the event
loop queues every read of a promotion with one system call (one vectored read per run of
adjacent slots: SlotIO.read_plan) and the kernel signals their ends on one eventfd the loop
watches. The checksums are verified on the loop (xxh3 runs at tens of GB/s). A run that fails
or comes back short is read again slot by slot in the pool, as SlotIO.read_slots does, so each
slot's result is its own.

Reads never outlive their buffers' owners: a read's buffers are held here until its completion
arrives, and close() is called only when none is in flight (SSDTier.close). Where the kernel
refuses the submission itself (an error io_uring_enter should never give) the ring is given up:
the reads the kernel had not taken come back as failed at once, those it took still complete,
and later reads go through the pool.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import mmap
from collections import deque

from kvstore.tiers.ssd.uring import Ring, address, iovecs
from kvstore.tiers.ssd.format import HEADER_BYTES
from kvstore.tiers.ssd.slotio import each_slot

log = logging.getLogger("kvstore.tiers.ssd.ringio")

RING_ENTRIES = 256       # reads in flight at once; more wait here in order


class RingReads:
    def __init__(self, files, ring: Ring, loop: asyncio.AbstractEventLoop):
        self._files, self._ring, self._loop = files, ring, loop
        self._scratch = mmap.mmap(-1, HEADER_BYTES)     # headers between payloads, dropped
        self._scratch_addr, self._scratch_keep = address(self._scratch)
        self._tag = 0
        self._pending: dict[int, tuple[asyncio.Future, object, list]] = {}
        self._backlog: deque = deque()
        self.broken = False
        loop.add_reader(ring.eventfd, self._reap)

    @classmethod
    def open(cls, files, loop: asyncio.AbstractEventLoop,
             entries: int = RING_ENTRIES) -> "RingReads | None":
        ring = Ring.create(entries)
        return None if ring is None else cls(files, ring, loop)

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    async def read_slots(self, reads) -> list:
        """For each (addr, view, key, nbytes, csum): True (read, verified), False (short read
        or wrong bytes) or the OSError reading it raised — SlotIO.read_slots's answer."""
        files = self._files
        plan = files.read_plan(reads)
        futs = [self._queue(fd, off, bufs) for _, fd, off, bufs, _ in plan]
        self._submit()
        got = await asyncio.gather(*futs)
        out: list = [None] * len(reads)
        retry: list[int] = []
        slots = nbytes = 0
        for (run, _, _, _, want), res in zip(plan, got):
            if res != want:
                retry += run
                continue
            for i in run:
                out[i] = files.verify(reads[i])
            slots += len(run)
            nbytes += want - (len(run) - 1) * HEADER_BYTES
        if slots:
            files.count_reads(slots, nbytes)
        if retry:
            again = await self._loop.run_in_executor(files.pool, each_slot, files.read_slot,
                                                     [reads[i] for i in retry])
            for i, r in zip(retry, again):
                out[i] = r
        return out

    def _queue(self, fd: int, offset: int, bufs: list) -> asyncio.Future:
        keep, pieces = [], []
        for b in bufs:
            if b is None:
                pieces.append((self._scratch_addr, HEADER_BYTES))
            else:
                addr, k = address(b)
                keep.append(k)
                pieces.append((addr, len(b)))
        iov = iovecs(pieces)
        tag, self._tag = self._tag, self._tag + 1
        fut = self._loop.create_future()
        self._pending[tag] = (fut, iov, keep)
        if self.broken:
            self._ended(tag, -errno.EIO)
        else:
            self._backlog.append((fd, offset, iov, tag))
        return fut

    def _submit(self) -> None:
        ring, backlog = self._ring, self._backlog
        while backlog and ring.free:
            fd, offset, iov, tag = backlog.popleft()
            ring.readv(fd, offset, iov, tag)
        try:
            ring.submit()
        except OSError as exc:
            log.error("io_uring submission failed (%s): SSD reads go through the thread pool "
                      "from now on", exc)
            self.broken = True
            for tag in ring.unsubmitted():
                self._ended(tag, -errno.EIO)
            while backlog:
                self._ended(backlog.popleft()[3], -errno.EIO)

    def _reap(self) -> None:
        for tag, res in self._ring.completions():
            self._ended(tag, res)
        if self._backlog and not self.broken:
            self._submit()

    def _ended(self, tag: int, res: int) -> None:
        fut, _, _ = self._pending.pop(tag)    # the buffers may go now
        if not fut.done():
            fut.set_result(res)

    def close(self) -> None:
        """Stop watching the ring and close it (no read may be in flight)."""
        try:
            self._loop.remove_reader(self._ring.eventfd)
        except (RuntimeError, ValueError):      # the loop is closed already
            pass
        self._ring.close()
