"""The io_uring read path (kvstore.tiers.ssd.uring, kvstore.tiers.ssd.ringio) against real slab files:
the same answers as the I/O threads' SlotIO.read_slots, byte for byte, for runs of adjacent
slots and scattered ones; a slot whose bytes do not verify is False, never served; a run the
kernel cuts short is read again slot by slot; a failed submission gives the ring up without
losing a read. Skipped where the kernel refuses io_uring (the daemon then uses its threads)."""
from __future__ import annotations

import asyncio
import errno
import mmap
import os
import select

import numpy as np
import pytest

from kvstore.tiers.ssd import uring
from kvstore.tiers.ssd.files import SlabFiles
from kvstore.tiers.ssd.ringio import RingIO

SLOT = 64 << 10


def _ring_or_skip():
    ring = uring.Ring.create(8)
    if ring is None:
        pytest.skip("io_uring is not available on this machine")
    return ring


def test_a_ring_reads_exact_bytes_into_several_buffers_and_reports_errors(tmp_path):
    ring = _ring_or_skip()
    path = tmp_path / "f"
    data = os.urandom(3 * 4096)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        a, b = mmap.mmap(-1, 4096), mmap.mmap(-1, 8192)
        (pa, ka), (pb, kb) = uring.address(a), uring.address(b)
        iov = uring.iovecs([(pa, 4096), (pb, 8192)])
        ring.readv(fd, 0, iov, 41)
        bad = uring.iovecs([(pa, 4096)])
        ring.readv(-1, 0, bad, 42)                       # a bad descriptor: -EBADF
        assert ring.in_flight == 2 and ring.free == ring.entries - 2
        ring.submit()
        got: dict = {}
        while len(got) < 2:
            assert select.select([ring.eventfd], [], [], 10)[0], "no completion signalled"
            for tag, res in ring.completions():
                got[tag] = res
        assert got == {41: 3 * 4096, 42: -errno.EBADF}
        assert bytes(a) == data[:4096] and bytes(b) == data[4096:]
        assert ring.in_flight == 0 and ring.completions() == []
    finally:
        os.close(fd)
        ring.close()


def _files_with_slots(tmp_path, n: int):
    files = SlabFiles(tmp_path / "ssd", 4 << 20, 1 << 20, io_threads=2)
    files.open()
    files.assign_segment(0, SLOT)
    rng = np.random.default_rng(3)
    slots = []
    for _ in range(n):
        addr = files.allocate(SLOT)
        buf = mmap.mmap(-1, SLOT)
        buf[:] = rng.integers(0, 256, SLOT, dtype=np.uint8).tobytes()
        key = os.urandom(16)
        csum = files.write_slot(addr, memoryview(buf), key, SLOT - 100)
        slots.append((addr, bytes(buf), key, csum))
    return files, slots


def _reads(slots, order):
    dests = [mmap.mmap(-1, SLOT) for _ in order]
    return dests, [(slots[i][0], memoryview(d), slots[i][2], SLOT - 100, slots[i][3])
                   for i, d in zip(order, dests)]


def test_ring_reads_answer_as_the_thread_path_does(tmp_path):
    _ring_or_skip().close()
    files, slots = _files_with_slots(tmp_path, 12)
    try:
        async def go():
            reader = RingIO.open(files, asyncio.get_running_loop())
            assert reader is not None
            try:
                # adjacent runs, a gap, reversed order, and a slot of another key
                order = [0, 1, 2, 3, 7, 6, 9, 11, 10]
                dests, reads = _reads(slots, order)
                wrong = list(reads[4])
                wrong[2] = os.urandom(16)
                reads[4] = tuple(wrong)
                got = await reader.read_slots(reads)
                want = [True] * len(order)
                want[4] = False
                assert got == want
                for i, d, ok in zip(order, dests, want):
                    if ok:
                        assert bytes(d) == slots[i][1]
                _, again = _reads(slots, order)
                again[4] = reads[4]
                assert files.read_slots(again) == got            # the I/O threads' answer
                # more reads than the ring holds wait their turn
                many = [i % 12 for i in range(40)]
                dests, reads = _reads(slots, many)
                small = RingIO.open(files, asyncio.get_running_loop(), entries=4)
                try:
                    assert await small.read_slots(reads) == [True] * 40
                    assert all(bytes(d) == slots[i][1] for i, d in zip(many, dests))
                finally:
                    small.close()
                assert reader.in_flight == 0
            finally:
                reader.close()
        asyncio.run(go())
    finally:
        files.close()


def test_corrupt_and_short_runs_fall_back_slot_by_slot_and_a_failed_submit_loses_nothing(
        tmp_path, monkeypatch):
    _ring_or_skip().close()
    files, slots = _files_with_slots(tmp_path, 6)
    try:
        # flip a byte of slot 2's payload on disk: its read is False, its neighbours True
        seg, off = files.payload_offset(slots[2][0])
        fd = os.open(files.directory / f"seg-{seg.number:05d}.slab", os.O_RDWR)   # buffered
        try:
            b = bytearray(os.pread(fd, 4096, off))
            b[10] ^= 0xFF
            os.pwrite(fd, bytes(b), off)
            os.fsync(fd)
        finally:
            os.close(fd)

        async def go():
            loop = asyncio.get_running_loop()
            reader = RingIO.open(files, loop)
            try:
                _, reads = _reads(slots, range(6))
                assert await reader.read_slots(reads) == [True, True, False, True, True, True]
                # the kernel answers a run short: those slots are read again one by one
                real = reader._ring.completions
                monkeypatch.setattr(reader._ring, "completions",
                                    lambda: [(t, r - 1) for t, r in real()])
                dests, reads = _reads(slots, [0, 1, 3])
                assert await reader.read_slots(reads) == [True, True, True]
                assert bytes(dests[2]) == slots[3][1]
                monkeypatch.setattr(reader._ring, "completions", real)

                # a submission the kernel refuses: the reads come back from the threads
                def refuse():
                    raise OSError(errno.EINVAL, "refused")
                monkeypatch.setattr(reader._ring, "submit", refuse)
                dests, reads = _reads(slots, [4, 5])
                assert await reader.read_slots(reads) == [True, True]
                assert reader.broken and reader.in_flight == 0
                assert bytes(dests[0]) == slots[4][1]
            finally:
                reader.close()
        asyncio.run(go())
    finally:
        files.close()


def test_ring_writes_read_back_exact_and_fall_back_as_the_thread_path_does(tmp_path, monkeypatch):
    """RingIO.write_slots: each slot's checksum, headers and payloads where SlotIO.write_slots
    puts them (the thread path reads every byte back and verifies it), adjacent slots in one
    request; a run the kernel writes short is written again slot by slot; with the fault hooks
    on, the pool writes (so injected failures still reach the tier)."""
    _ring_or_skip().close()
    files = SlabFiles(tmp_path / "ssd", 4 << 20, 1 << 20, io_threads=2)
    files.open()
    files.assign_segment(0, SLOT)
    rng = np.random.default_rng(4)

    def items(n):
        out, payloads = [], []
        for _ in range(n):
            buf = mmap.mmap(-1, SLOT)
            buf[:] = rng.integers(0, 256, SLOT, dtype=np.uint8).tobytes()
            out.append((files.allocate(SLOT), memoryview(buf), os.urandom(16), SLOT - 100))
            payloads.append(bytes(buf))
        return out, payloads

    def read_back(writes, csums):
        dests, reads = [], []
        for (addr, _, key, nbytes), c in zip(writes, csums):
            d = mmap.mmap(-1, SLOT)
            dests.append(d)
            reads.append((addr, memoryview(d), key, nbytes, c))
        return files.read_slots(reads), [bytes(d) for d in dests]

    try:
        async def go():
            ring = RingIO.open(files, asyncio.get_running_loop())
            try:
                writes, payloads = items(6)
                csums = await ring.write_slots(writes)
                assert all(isinstance(c, int) for c in csums)
                ok, got = read_back(writes, csums)
                assert ok == [True] * 6 and got == payloads
                assert files.counters.writes >= 6
                # the kernel answers a run short: written again slot by slot
                real = ring._ring.completions
                monkeypatch.setattr(ring._ring, "completions",
                                    lambda: [(t, r - 1) for t, r in real()])
                writes, payloads = items(3)
                csums = await ring.write_slots(writes)
                monkeypatch.setattr(ring._ring, "completions", real)
                ok, got = read_back(writes, csums)
                assert ok == [True] * 3 and got == payloads
                # fault hooks: the pool applies them
                monkeypatch.setattr(files, "_fault_errno", errno.ENOSPC)
                monkeypatch.setattr(files, "_fault_after", 0)
                writes, _ = items(2)
                res = await ring.write_slots(writes)
                assert all(isinstance(r, OSError) and r.errno == errno.ENOSPC for r in res)
                assert ring.in_flight == 0
            finally:
                ring.close()
        asyncio.run(go())
    finally:
        files.close()
