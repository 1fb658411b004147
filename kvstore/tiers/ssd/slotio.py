"""The SSD tier's slot I/O: whole slots between the slab files and 4 KiB-aligned buffers.

Contract:
- ``read_slots`` / ``write_slots`` (one call per pool task) and ``read_slot`` / ``write_slot``
  move whole slots between the files and 4 KiB-aligned buffers (arena slots are page aligned)
  with os.preadv/pwritev, which release the GIL, on a bounded pool of ``io_threads`` threads.
  Slots adjacent in one file move with one vectored call (header, payload, header, payload,
  ...): one system call, one GIL hand-off and one thread wake-up per run instead of per block.
  With O_DIRECT the page cache is bypassed; where the filesystem refuses O_DIRECT (tmpfs) the
  files are opened buffered (kvstore.tiers.ssd.files).
- Every block carries an xxh3-64 checksum of its bytes, seeded with its key, computed on write
  and verified on every read (kvstore.tiers.ssd.format.block_checksum, which releases the GIL
  for large buffers): a torn, corrupted or misplaced slot is reported as a mismatch, never as
  data. Reads read the payloads only (headers between adjacent payloads land in a scratch page).
- A failed write (ENOSPC, EIO) is that slot's OSError, returned to the caller, who drops that
  block from the tier; a failed or short vectored call is redone slot by slot, so one slot's
  failure stays its own.

State owned here: the I/O pool, the counters, the per-thread header buffers, the test hooks.
A base of kvstore.tiers.ssd.files.SlabFiles (the segments and the sequence clock belong to the
allocator, kvstore.tiers.ssd.allocator).
"""
from __future__ import annotations

import errno
import mmap
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from kvstore.tiers.ssd.allocator import SLOT_MASK, Segment
from kvstore.tiers.ssd.format import (HEADER_BYTES, SLOT_BITS, block_checksum,
                                      encode_segment_header, encode_slot_header, slot_offset)

# Test hook (fault injection at the OS boundary): after N successful slot writes, every write
# fails with this errno. Both must be set; unset in production.
_FAULT_ERRNO_ENV = "KVSTORE_TEST_SSD_WRITE_ERRNO"
_FAULT_AFTER_ENV = "KVSTORE_TEST_SSD_WRITE_FAIL_AFTER"
# Test hook (a slow disk): every slot write sleeps this many seconds first, in its I/O thread.
_WRITE_DELAY_ENV = "KVSTORE_TEST_SSD_WRITE_DELAY_S"
_MAX_RUN = 256       # slots per vectored call: two iovecs each, under IOV_MAX (1024)


@dataclass
class SSDCounters:
    bytes_read: int = 0
    bytes_written: int = 0
    reads: int = 0
    writes: int = 0
    write_errors: int = 0
    read_errors: int = 0
    checksum_failures: int = 0
    recovered_blocks: int = 0
    sync_demotions: int = 0     # write-back victims written while eviction waited
    cleaned: int = 0            # write-back blocks written ahead of eviction
    segments_reassigned: int = 0  # segments emptied and given to another block size


class SlotIO:
    """Slot reads and writes (run them in ``pool``). ``_init_io`` sets the state it owns."""

    segments: list[Segment]

    def _init_io(self, io_threads: int, read_limiter) -> None:
        self.io_threads = io_threads
        self.pool = ThreadPoolExecutor(io_threads, thread_name_prefix="kvstore-ssd")
        self.counters = SSDCounters()
        self.read_limiter = read_limiter   # kvstore.tiers.ssd.ratelimit.TokenBucket, or None
        self._fault_errno = int(os.environ.get(_FAULT_ERRNO_ENV, "0") or 0)
        self._fault_after = int(os.environ.get(_FAULT_AFTER_ENV, "-1") or -1)
        self._writes_ok = 0
        self._write_delay_s = float(os.environ.get(_WRITE_DELAY_ENV, "0") or 0)
        self._fault_lock = threading.Lock()
        self._stat_lock = threading.Lock()   # counters are bumped from the I/O threads
        self._tls = threading.local()        # aligned header buffers, one set per I/O thread

    def _header_buf(self) -> mmap.mmap:
        buf = getattr(self._tls, "buf", None)
        if buf is None:
            buf = self._tls.buf = mmap.mmap(-1, HEADER_BYTES)   # page aligned: O_DIRECT
        return buf

    def write_slot(self, addr: int, view: memoryview, key: bytes, nbytes: int,
                   tag: bytes = b"") -> int:
        """Write one slot from ``view`` (slot_bytes long, 4 KiB aligned) behind its header
        (which carries ``tag``, at most MAX_TAG_BYTES, opaque here), in one pwritev; returns
        the checksum of its first ``nbytes``. Raises OSError on failure (ENOSPC, EIO, short
        write)."""
        csum = block_checksum(view[:nbytes], key)
        if self._write_delay_s:
            time.sleep(self._write_delay_s)
        if self._fault_errno and self._fault_after >= 0:
            with self._fault_lock:
                if self._writes_ok >= self._fault_after:
                    raise OSError(self._fault_errno, os.strerror(self._fault_errno) + " (injected)")
                self._writes_ok += 1
        seg = self.segments[addr >> SLOT_BITS]
        slot = addr & ((1 << SLOT_BITS) - 1)
        hdr = self._fill_header(addr, key, nbytes, csum, seg, tag)
        n = os.pwritev(seg.fd, [hdr, view], slot_offset(slot, seg.slot_bytes))
        if n != len(view) + HEADER_BYTES:
            raise OSError(errno.EIO, f"short write of {n}/{len(view) + HEADER_BYTES} bytes")
        n = len(view)         # the counters are block bytes, as every tier's (headers aside)
        self.count_write(n)
        return csum

    def _fill_header(self, addr: int, key: bytes, nbytes: int, csum: int, seg: Segment,
                     tag: bytes) -> memoryview:
        view = memoryview(self._header_buf())
        self._fill_header_into(view, addr, key, nbytes, csum, seg, tag)
        return view

    def _fill_header_into(self, view: memoryview, addr: int, key: bytes, nbytes: int,
                          csum: int, seg: Segment, tag: bytes) -> None:
        seq = self.next_seq()
        view[:] = encode_slot_header(addr, key, nbytes, csum, seq, seg.slot_bytes, tag)
        # Recorded before the write returns: the caller journals the block with this number.
        seg.seq[addr & SLOT_MASK] = seq

    def write_header(self, addr: int, key: bytes, nbytes: int, csum: int, tag: bytes = b"") -> None:
        """Write only a slot's header (a path that writes the payload itself: GDS)."""
        seg = self.segments[addr >> SLOT_BITS]
        hdr = self._fill_header(addr, key, nbytes, csum, seg, tag)
        off = slot_offset(addr & ((1 << SLOT_BITS) - 1), seg.slot_bytes)
        if os.pwritev(seg.fd, [hdr], off) != HEADER_BYTES:
            raise OSError(errno.EIO, "short slot header write")

    def _write_segment_header(self, seg: Segment) -> None:
        """Record the segment's slot size in the file itself (scan reads it when the journal is
        lost). Its sequence number outdates every slot header written under the old size."""
        buf = self._header_buf()
        buf[:] = encode_segment_header(seg.number, seg.slot_bytes,
                                       self.next_seq()).ljust(HEADER_BYTES, b"\0")
        n = os.pwritev(seg.fd, [memoryview(buf)], 0)
        if n != HEADER_BYTES:
            raise OSError(errno.EIO, f"short segment header write of {n} bytes")

    def count_write(self, nbytes: int) -> None:
        """One slot written (from any I/O thread, or kvstore.tiers.ssd.gds). Bandwidth is the
        slope of these byte counters (kvstore.metrics.model.RateMeter), as for every tier."""
        self.count_writes(1, nbytes)

    def count_read(self, nbytes: int) -> None:
        """One slot read (from any I/O thread, or kvstore.tiers.ssd.gds)."""
        self.count_reads(1, nbytes)

    def count_reads(self, slots: int, nbytes: int) -> None:
        with self._stat_lock:
            self.counters.bytes_read += nbytes
            self.counters.reads += slots

    def count_writes(self, slots: int, nbytes: int) -> None:
        with self._stat_lock:
            self.counters.bytes_written += nbytes
            self.counters.writes += slots

    def payload_offset(self, addr: int) -> tuple[Segment, int]:
        seg = self.segments[addr >> SLOT_BITS]
        return seg, slot_offset(addr & ((1 << SLOT_BITS) - 1), seg.slot_bytes) + HEADER_BYTES

    def write_slots(self, writes) -> list:
        """write_slot for each (addr, view, key, nbytes[, tag]), in this thread; each result is
        the checksum, or the OSError that write raised. Slots adjacent in one segment file are
        written by one pwritev (header, payload, header, payload, ...): one system call and one
        GIL hand-off per run instead of per block. A run that fails is retried slot by slot, so
        one slot's failure stays its own."""
        if self._write_delay_s or self._fault_errno:
            return each_slot(self.write_slot, writes)    # the test hooks count single slots
        out: list = [None] * len(writes)
        for run in _runs(writes, self._stride):
            if len(run) == 1:
                i = run[0]
                out[i] = _attempt(self.write_slot, writes[i])
                continue
            try:
                csums = self._write_run([writes[i] for i in run])
            except OSError:
                csums = [_attempt(self.write_slot, writes[i]) for i in run]
            for i, c in zip(run, csums):
                out[i] = c
        return out

    def _write_run(self, writes) -> list[int]:
        """Write slots adjacent in one file (sorted by address) with one pwritev."""
        seg = self.segments[writes[0][0] >> SLOT_BITS]
        n = len(writes)
        hdrs = self._run_headers(n)
        iov, csums = [], []
        for j, (addr, view, key, nbytes, *tag) in enumerate(writes):
            csum = block_checksum(view[:nbytes], key)
            hdr = hdrs[j * HEADER_BYTES:(j + 1) * HEADER_BYTES]
            self._fill_header_into(hdr, addr, key, nbytes, csum, seg, tag[0] if tag else b"")
            iov += (hdr, view)
            csums.append(csum)
        want = sum(len(w[1]) for w in writes) + n * HEADER_BYTES
        got = os.pwritev(seg.fd, iov, slot_offset(writes[0][0] & SLOT_MASK, seg.slot_bytes))
        if got != want:
            raise OSError(errno.EIO, f"short write of {got}/{want} bytes")
        self.count_writes(n, want - n * HEADER_BYTES)
        return csums

    def _run_headers(self, n: int) -> memoryview:
        """An aligned buffer of n slot headers, this thread's own (grown as needed)."""
        buf = getattr(self._tls, "run_hdrs", None)
        if buf is None or len(buf) < n * HEADER_BYTES:
            buf = self._tls.run_hdrs = mmap.mmap(-1, max(n, 16) * HEADER_BYTES)
        return memoryview(buf)

    def read_slots(self, reads) -> list:
        """read_slot for each (addr, view, key, nbytes, csum), in this thread; each result is
        True/False, or the OSError that read raised. Slots adjacent in one segment file are read
        by one preadv straight into their destinations (the headers between them into a
        scratch page): one system call and one GIL hand-off per run. A run that fails or comes
        back short is read again slot by slot."""
        out: list = [None] * len(reads)
        for run in _runs(reads, self._stride):
            if len(run) > 1:
                try:
                    ok = self._read_run([reads[i] for i in run])
                except OSError:
                    ok = None
                if ok is not None:
                    for i, r in zip(run, ok):
                        out[i] = r
                    continue
            for i in run:
                out[i] = _attempt(self.read_slot, reads[i])
        return out

    def read_plan(self, reads) -> list[tuple[list[int], int, int, list, int]]:
        """How read_slots moves these (addr, view, key, nbytes, csum) reads, for a caller that
        issues the reads itself (kvstore.tiers.ssd.ringio): one vectored read per run of
        adjacent slots, as (indices into ``reads``, fd, file offset, buffers, bytes wanted);
        ``None`` among the buffers stands for a slot header between two payloads (read into
        scratch and dropped). Then check each slot with :meth:`verify` and count it with
        count_reads."""
        plan = []
        for run in _runs(reads, self._stride):
            seg, off = self.payload_offset(reads[run[0]][0])
            bufs: list = [reads[run[0]][1]]
            for i in run[1:]:
                bufs += (None, reads[i][1])
            want = sum(len(reads[i][1]) for i in run) + (len(run) - 1) * HEADER_BYTES
            plan.append((run, seg.fd, off, bufs, want))
        return plan

    @property
    def injecting_faults(self) -> bool:
        """The test hooks that slow or fail single slot writes are on (KVSTORE_TEST_SSD_*):
        writes must then go through write_slots, which applies them."""
        return bool(self._write_delay_s or self._fault_errno)

    def write_plan(self, writes) -> list[tuple[list[int], int, int, list, int, list[int]]]:
        """How write_slots moves these (addr, view, key, nbytes[, tag]) writes, for a caller
        that issues the writes itself (kvstore.tiers.ssd.ringio): per run of adjacent slots,
        (indices into ``writes``, fd, file offset, buffers, bytes, checksums), the buffers being
        each slot's header (computed now, with its checksum and sequence number, in memory of
        the run's own) then its payload. Count what was written with count_writes; a run that
        fails or comes back short is written again slot by slot (write_slot)."""
        plan = []
        for run in _runs(writes, self._stride):
            seg = self.segments[writes[run[0]][0] >> SLOT_BITS]
            hdrs = memoryview(mmap.mmap(-1, len(run) * HEADER_BYTES))   # page aligned
            bufs: list = []
            csums: list[int] = []
            for j, i in enumerate(run):
                addr, view, key, nbytes, *tag = writes[i]
                csum = block_checksum(view[:nbytes], key)
                hdr = hdrs[j * HEADER_BYTES:(j + 1) * HEADER_BYTES]
                self._fill_header_into(hdr, addr, key, nbytes, csum, seg, tag[0] if tag else b"")
                bufs += (hdr, view)
                csums.append(csum)
            want = sum(len(writes[i][1]) for i in run) + len(run) * HEADER_BYTES
            off = slot_offset(writes[run[0]][0] & SLOT_MASK, seg.slot_bytes)
            plan.append((run, seg.fd, off, bufs, want, csums))
        return plan

    @staticmethod
    def verify(read) -> bool:
        """Whether a slot read's (addr, view, key, nbytes, csum) bytes match its checksum."""
        _, view, key, nbytes, csum = read
        return block_checksum(view[:nbytes], key) == csum

    def _read_run(self, reads) -> list[bool] | None:
        """Read slots adjacent in one file (sorted by address) with one preadv; None when it
        came back short (the caller reads them one by one)."""
        seg, off = self.payload_offset(reads[0][0])
        scratch = memoryview(self._header_buf())
        iov = [reads[0][1]]
        for r in reads[1:]:
            iov += (scratch, r[1])
        want = sum(len(r[1]) for r in reads) + (len(reads) - 1) * HEADER_BYTES
        if self.read_limiter is not None:
            self.read_limiter.take(want)
        got = os.preadv(seg.fd, iov, off)
        if got != want:
            return None
        self.count_reads(len(reads), want - (len(reads) - 1) * HEADER_BYTES)
        return [block_checksum(view[:nbytes], key) == csum
                for _, view, key, nbytes, csum in reads]

    def read_ranges(self, reads) -> list:
        """For each (addr, view, start, hasher): read bytes [start, start + len(view)) of the
        slot's payload into ``view`` (one preadv), then feed them to ``hasher`` (a streaming
        xxh3 of the block: the ranges of one block arrive in order, one call after another);
        each result is True, False (short read) or the OSError the read raised. The layer-wise
        promotion's reads (SSDTier.read_layers): the checksum is checked by the caller once every
        range of the block has been fed."""
        out: list = []
        for addr, view, start, hasher in reads:
            try:
                seg, off = self.payload_offset(addr)
                if self.read_limiter is not None:
                    self.read_limiter.take(len(view))
                n = os.preadv(seg.fd, [view], off + start)
            except OSError as exc:
                out.append(exc)
                continue
            self.count_reads(1 if start == 0 else 0, n)    # one slot read, in ranges
            if n != len(view):
                out.append(False)
                continue
            hasher.update(view)
            out.append(True)
        return out

    def _stride(self, addr: int, nbytes: int) -> int:
        """The slot size of ``addr``'s segment when a buffer of ``nbytes`` fills exactly that
        slot (only such slots are coalesced), else 0."""
        sb = self.segments[addr >> SLOT_BITS].slot_bytes
        return sb if nbytes == sb else 0

    def read_slot(self, addr: int, view: memoryview, key: bytes, nbytes: int, csum: int) -> bool:
        """Read one slot into ``view``; True iff its first ``nbytes`` match ``csum``.
        Raises OSError on an I/O error."""
        seg, off = self.payload_offset(addr)
        if self.read_limiter is not None:
            self.read_limiter.take(len(view))
        n = os.preadv(seg.fd, [view], off)
        self.count_read(n)
        if n != len(view):
            return False
        return block_checksum(view[:nbytes], key) == csum


def each_slot(op, items) -> list:
    """op(*item) for each item, sequentially in this thread (one pool task runs a group of
    slots); each result is op's, or the OSError it raised — one slot's failure is its own."""
    return [_attempt(op, item) for item in items]


def _attempt(op, item):
    try:
        return op(*item)
    except OSError as exc:
        return exc


def _runs(items, stride) -> list[list[int]]:
    """Indices of ``items`` ((addr, buffer, ...) each) in address order, cut into runs of slots
    that follow each other in one segment file and whose buffers fill their slot exactly
    (``stride(addr, len(buffer))`` is the slot size, else 0: such an item is a run of one)."""
    order = sorted(range(len(items)), key=lambda i: items[i][0])
    runs: list[list[int]] = []
    prev = prev_stride = None
    for i in order:
        addr = items[i][0]
        st = stride(addr, len(items[i][1]))
        if runs and st and st == prev_stride and addr == prev + 1 and \
                addr >> SLOT_BITS == prev >> SLOT_BITS and len(runs[-1]) < _MAX_RUN:
            runs[-1].append(i)
        else:
            runs.append([i])
        prev, prev_stride = addr, st
    return runs
