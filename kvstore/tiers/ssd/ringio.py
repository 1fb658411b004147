"""SSD slot reads and writes through io_uring, issued and completed on the event loop's thread.

    ring = RingIO.open(files, loop)          # None where no ring can be set up
    results = await ring.read_slots(reads)   # what SlotIO.read_slots answers, per slot
    results = await ring.write_slots(writes) # what SlotIO.write_slots answers, per slot
    ring.close()                             # once nothing is in flight

Through the thread pool every I/O task costs a hand-off to a pool thread and one back, and each
pool thread takes the interpreter's lock for its Python steps; on a busy daemon those context
switches and lock waits cost more CPU than the I/O itself. Here the event loop queues every
request of a promotion or a commit with one system call (one vectored request per run of
adjacent slots: SlotIO.read_plan / write_plan) and the kernel signals their ends on one eventfd
the loop watches. Checksums are computed or verified on the loop (xxh3 runs at tens of GB/s). A
run that fails or comes back short is redone slot by slot in the pool, as SlotIO's vectored
calls are, so each slot's result is its own.

Requests never outlive their buffers' owners: a request's buffers are held here until its
completion arrives, and close() is called only when none is in flight (SSDTier.close). Where the
kernel refuses the submission itself (an error io_uring_enter should never give) the ring is
given up: the requests the kernel had not taken come back as failed at once (and are redone in
the pool), those it took still complete, and later requests go through the pool.
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

RING_ENTRIES = 256       # requests in flight at once; more wait here in order


class RingIO:
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
             entries: int = RING_ENTRIES) -> "RingIO | None":
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
        futs = [self._queue(False, fd, off, bufs) for _, fd, off, bufs, _ in plan]
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
        await self._redo(files.read_slot, reads, retry, out)
        return out

    async def write_slots(self, writes) -> list:
        """For each (addr, view, key, nbytes[, tag]): the checksum written in its header, or
        the OSError writing it raised — SlotIO.write_slots's answer. With the test hooks that
        slow or fail single writes on, the pool writes (they apply there)."""
        files = self._files
        if files.injecting_faults:
            return await self._loop.run_in_executor(files.pool, files.write_slots, writes)
        plan = files.write_plan(writes)
        futs = [self._queue(True, fd, off, bufs) for _, fd, off, bufs, _, _ in plan]
        self._submit()
        got = await asyncio.gather(*futs)
        out: list = [None] * len(writes)
        retry: list[int] = []
        slots = nbytes = 0
        for (run, _, _, _, want, csums), res in zip(plan, got):
            if res != want:
                retry += run
                continue
            for i, c in zip(run, csums):
                out[i] = c
            slots += len(run)
            nbytes += want - len(run) * HEADER_BYTES
        if slots:
            files.count_writes(slots, nbytes)
        await self._redo(files.write_slot, writes, retry, out)
        return out

    async def _redo(self, op, items: list, retry: list[int], out: list) -> None:
        """Redo ``items[retry]`` slot by slot in the pool (``op``: SlotIO.read_slot or
        write_slot), as SlotIO redoes a vectored call that failed or came back short: each
        slot's result, or the OSError it raised, goes to ``out``."""
        if retry:
            again = await self._loop.run_in_executor(self._files.pool, each_slot, op,
                                                     [items[i] for i in retry])
            for i, r in zip(retry, again):
                out[i] = r

    def read(self, fd: int, offset: int, bufs: list) -> asyncio.Future:
        """Queue one vectored read of ``bufs`` at ``offset`` of ``fd`` (sent by the next
        :meth:`submit`): a future of the bytes read, or -errno. Its buffers are held until it
        ends, whoever awaits it."""
        return self._queue(False, fd, offset, bufs)

    def submit(self) -> None:
        """Send what read queued."""
        self._submit()

    def _queue(self, write: bool, fd: int, offset: int, bufs: list) -> asyncio.Future:
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
            self._backlog.append((write, fd, offset, iov, tag))
        return fut

    def _submit(self) -> None:
        ring, backlog = self._ring, self._backlog
        while backlog and ring.free:
            write, fd, offset, iov, tag = backlog.popleft()
            (ring.writev if write else ring.readv)(fd, offset, iov, tag)
        try:
            ring.submit()
        except OSError as exc:
            log.error("io_uring submission failed (%s): SSD reads and writes go through the "
                      "thread pool from now on", exc)
            self.broken = True
            for tag in ring.unsubmitted():
                self._ended(tag, -errno.EIO)
            while backlog:
                self._ended(backlog.popleft()[4], -errno.EIO)

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
        """Stop watching the ring and close it (nothing may be in flight)."""
        try:
            self._loop.remove_reader(self._ring.eventfd)
        except (RuntimeError, ValueError):      # the loop is closed already
            pass
        self._ring.close()
