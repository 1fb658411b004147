"""The SSD tier's slab files: preallocated files with fixed-size slots, O_DIRECT I/O in a thread
pool. The on-disk format (layout, superblock, headers) is kvstore.tiers.ssd.format.

Capacity is cut into segments; a segment is handed to one size class (one slot size: a block size
rounded up to 4 KiB) the first time that class needs room, and cut into slots; an emptied segment
can be re-cut for another class (``reassign_segment``; the policy is kvstore.tiers.ssd.space.SSDSpace). A
slot address is ``segment << 32 | slot``. Millions of blocks live in a handful of files: no file per block.

I/O contract:
- ``read_into(addr, view)`` / ``write_from(addr, view)`` move one whole slot between the file and
  a 4 KiB-aligned buffer (an arena slot: arena slots are page aligned) with os.preadv/pwritev,
  which release the GIL, on a bounded pool of ``io_threads`` threads. With O_DIRECT the page
  cache is bypassed; where the filesystem refuses O_DIRECT (tmpfs) the tier falls back to
  buffered I/O and logs it.
- Every block carries an xxh3-64 checksum of its bytes, seeded with its key, computed on write
  and verified on every read: a torn, corrupted or misplaced slot is reported as a mismatch,
  never as data. Reads read the payload only (not the header).
- A failed write (ENOSPC, EIO) raises OSError to the caller, who drops that block from the tier.
"""
from __future__ import annotations

import errno
import logging
import mmap
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kvstore.core import lockfile
from kvstore.core.directio import direct_io_works
from kvstore.core.units import format_bytes
from kvstore.tiers.ssd.format import (ALIGN, FORMAT_VERSION, HEADER_BYTES, SLOT_BITS,
                                      SUPERBLOCK_COPY, SSDFormatError, ScannedSlot,
                                      auto_segment_bytes, block_checksum, decode_segment_header,
                                      decode_slot_header, encode_segment_header,
                                      encode_slot_header, read_superblock, slot_offset,
                                      slots_per_segment, write_superblock)

log = logging.getLogger("kvstore.ssd")

RESERVED = -2        # Segment.owner of a slot the loading index will restore (reserve_slots)
# Test hook (fault injection at the OS boundary): after N successful slot writes, every write
# fails with this errno. Both must be set; unset in production.
_FAULT_ERRNO_ENV = "KVSTORE_TEST_SSD_WRITE_ERRNO"
_FAULT_AFTER_ENV = "KVSTORE_TEST_SSD_WRITE_FAIL_AFTER"
# Test hook (a slow disk): every slot write sleeps this many seconds first, in its I/O thread.
_WRITE_DELAY_ENV = "KVSTORE_TEST_SSD_WRITE_DELAY_S"


class SSDSpaceError(OSError):
    """The filesystem has less free space than the slab files still need (checked before any
    is preallocated); ``need_bytes`` and ``free_bytes`` say by how much."""

    def __init__(self, message: str, need_bytes: int, free_bytes: int):
        super().__init__(errno.ENOSPC, message)
        self.need_bytes = need_bytes
        self.free_bytes = free_bytes


@dataclass
class Segment:
    number: int
    fd: int
    slot_bytes: int = 0                        # 0: not yet given to a size class
    owner: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    free: list[int] = field(default_factory=list)
    # Sequence number of the block each slot holds (written in its header; journaled with it).
    seq: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.uint64))


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


class SlabFiles:
    """Slab files under ``directory``. Create with :meth:`open` (recovers an existing directory)."""

    def __init__(self, directory: Path, capacity_bytes: int, segment_bytes: int = 0,
                 io_threads: int = 8, direct: bool = True, read_limiter=None):
        """segment_bytes 0: the directory's own segment size, or for a new directory about
        1/64 of the capacity (64 MiB .. 16 GiB): few files even at many TiB."""
        self.directory = Path(directory)
        self._requested_capacity = capacity_bytes
        self._requested_segment = segment_bytes // ALIGN * ALIGN
        self._set_geometry(self._requested_segment or auto_segment_bytes(capacity_bytes))
        self.io_threads = io_threads
        self.want_direct = direct
        self.direct = False
        self.segments: list[Segment] = []
        self.pool = ThreadPoolExecutor(io_threads, thread_name_prefix="kvstore-ssd")
        self.counters = SSDCounters()
        self.read_limiter = read_limiter   # kvstore.tiers.ssd.ratelimit.TokenBucket, or None
        self._fault_errno = int(os.environ.get(_FAULT_ERRNO_ENV, "0") or 0)
        self._fault_after = int(os.environ.get(_FAULT_AFTER_ENV, "-1") or -1)
        self._writes_ok = 0
        self._write_delay_s = float(os.environ.get(_WRITE_DELAY_ENV, "0") or 0)
        self._fault_lock = threading.Lock()
        self._stat_lock = threading.Lock()   # counters are bumped from the I/O threads
        self._seq = 0
        self._seq_lock = threading.Lock()
        self._tls = threading.local()        # one aligned header buffer per I/O thread
        self.created = False                 # open() made a new directory (nothing to recover)
        self._made: list[Path] = []          # files this open() created (discard_created)
        self._made_dirs: list[Path] = []     # directories it created, outermost first

    def _set_geometry(self, segment_bytes: int) -> None:
        self.segment_bytes = max(ALIGN, segment_bytes)
        self.n_segments = max(1, self._requested_capacity // self.segment_bytes)

    @property
    def capacity_bytes(self) -> int:
        return self.n_segments * self.segment_bytes

    # -- sequence numbers ----------------------------------------------------------------------
    def next_seq(self) -> int:
        """A number larger than every one handed out or recovered so far (a hybrid clock: wall
        clock ns when it moves forward, last + 1 otherwise)."""
        with self._seq_lock:
            self._seq = max(time.time_ns(), self._seq + 1)
            return self._seq

    def observe_seq(self, seq: int) -> None:
        """Floor the clock at a recovered number (a clock stepped back across a restart)."""
        with self._seq_lock:
            self._seq = max(self._seq, int(seq))

    def _header_buf(self) -> mmap.mmap:
        buf = getattr(self._tls, "buf", None)
        if buf is None:
            buf = self._tls.buf = mmap.mmap(-1, HEADER_BYTES)   # page aligned: O_DIRECT
        return buf

    # -- lifecycle ---------------------------------------------------------------------------
    def open(self) -> None:
        """Create or check the directory and preallocate every segment file.

        Raises SSDFormatError for a directory of another format or segment size, OSError when
        the files cannot be created (no space for the preallocation, no permission)."""
        missing = [p for p in (self.directory, *self.directory.parents) if not p.exists()]
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._made_dirs = missing[::-1]
        if not (self.directory / "lock").exists():
            self._made.append(self.directory / "lock")
        try:
            self._lock_fd = lockfile.take(self.directory / "lock")
        except lockfile.LockHeld as exc:
            self._made = []        # the holder's lock file, not ours
            self._made_dirs = []
            raise SSDFormatError(f"{self.directory} is in use by another kvstore daemon (pid "
                                 f"{exc.pid}); stop it or set --ssd-dir to another "
                                 "directory") from None
        try:
            self._open_locked()
        except BaseException:
            self._release_files()
            self.discard_created()
            raise

    def discard_created(self) -> None:
        """Remove what open() created — slab files, superblock, lock file, directories — so a
        start-up that failed leaves nothing a restart could misread (a superblock and slab
        files without a journal read as a lost journal). Call with the files closed; what
        existed before open() is left alone."""
        for p in reversed(self._made):
            try:
                p.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("SSD tier: cannot remove %s after a failed start: %s", p, exc)
        for d in reversed(self._made_dirs):
            try:
                d.rmdir()
            except OSError:
                break        # something else was put there meanwhile: leave it
        self._made, self._made_dirs = [], []

    def _open_locked(self) -> None:
        self._check_superblock()
        self._check_free_space()
        _raise_fd_limit(self.n_segments + 1024)
        flags = os.O_RDWR | os.O_CREAT
        direct_flag = getattr(os, "O_DIRECT", 0)
        for n in range(self.n_segments):
            path = self.directory / f"seg-{n:05d}.slab"
            fd = None
            if not path.exists():
                self._made.append(path)
            if self.want_direct and direct_flag:
                try:
                    fd = os.open(path, flags | direct_flag, 0o600)
                    self.direct = True
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    self.direct = False
            if fd is None:
                fd = os.open(path, flags, 0o600)
            try:
                if os.fstat(fd).st_size < self.segment_bytes:
                    os.posix_fallocate(fd, 0, self.segment_bytes)
            except OSError as exc:
                os.close(fd)
                raise OSError(exc.errno, f"cannot preallocate {self.segment_bytes} bytes for "
                              f"{path}: {exc.strerror}. Lower --ssd-bytes or free disk space") from None
            if self.direct and not direct_io_works(fd):
                # Some filesystems accept O_DIRECT at open and refuse it on I/O.
                os.close(fd)
                fd = os.open(path, flags, 0o600)
                self.direct = False
            self.segments.append(Segment(n, fd))
        if self.want_direct and not self.direct:
            log.warning("SSD tier: %s refuses O_DIRECT (tmpfs?): using buffered I/O",
                        self.directory)
        # Any segment files beyond the configured capacity are left alone but unused.

    def _check_free_space(self) -> None:
        """Refuse up front when the filesystem cannot hold the slab files still to be
        preallocated (SSDSpaceError): filling the disk one segment at a time until ENOSPC
        would starve everything else on it."""
        need = 0
        for n in range(self.n_segments):
            try:
                st = os.stat(self.directory / f"seg-{n:05d}.slab")
                have = min(st.st_size, st.st_blocks * 512)
            except FileNotFoundError:
                have = 0
            need += max(0, self.segment_bytes - have)
        vfs = os.statvfs(self.directory)
        free = vfs.f_bavail * vfs.f_frsize
        if need > free:
            fits = (free + self._allocated_bytes()) // self.segment_bytes * self.segment_bytes
            raise SSDSpaceError(
                f"{self.directory} has {format_bytes(free)} free, and "
                f"{format_bytes(self.capacity_bytes)} of slab files need {format_bytes(need)} "
                f"more; lower --ssd-bytes (at most about {format_bytes(fits)} fits there) or "
                "free disk space", need, free)

    def _allocated_bytes(self) -> int:
        total = 0
        for n in range(self.n_segments):
            try:
                st = os.stat(self.directory / f"seg-{n:05d}.slab")
            except FileNotFoundError:
                continue
            total += min(st.st_size, st.st_blocks * 512, self.segment_bytes)
        return total

    def _check_superblock(self) -> None:
        """Read the superblock (or, when it is damaged, its copy, or failing both, rebuild it
        from the slab files' segment headers, saying so in the log), check it against the
        configuration, and keep both copies intact; a new directory gets both."""
        sb = self.directory / "superblock"
        copy = self.directory / SUPERBLOCK_COPY
        meta, why = read_superblock(sb)
        repair: list[Path] = []          # rewritten once the fields are known to be usable
        if meta is not None:
            kept, copy_why = read_superblock(copy)
            if kept != meta:
                if copy_why not in ("missing", None):
                    log.warning("SSD tier: %s is damaged (%s): rewritten from the superblock",
                                copy, copy_why)
                repair = [copy]
        elif why != "missing" or copy.exists():
            meta, copy_why = read_superblock(copy)
            if meta is not None:
                log.warning("SSD tier: %s is damaged (%s): restored from its copy %s", sb, why,
                            copy)
                repair = [sb]
            else:
                meta = self._superblock_from_slabs()
                if meta is None:
                    if why == "bad magic":
                        raise SSDFormatError(f"{self.directory} is not a kvstore SSD directory "
                                             "(bad superblock magic); choose another --ssd-dir")
                    raise SSDFormatError(f"{sb}: unreadable superblock ({why}; its copy: "
                                         f"{copy_why}) and no slab file says its format")
                log.warning("SSD tier: %s is damaged (%s) and so is its copy (%s): rebuilt "
                            "from the slab files' segment headers (format %d, segments of %d "
                            "bytes)", sb, why, copy_why, meta["format_version"],
                            meta["segment_bytes"])
                repair = [sb, copy]
        if meta is not None:
            self._check_meta(sb, meta)
            for path in repair:
                write_superblock(path, meta)
            return
        if any(self.directory.glob("seg-*.slab")) or (self.directory / "journal").exists():
            raise SSDFormatError(f"{self.directory} holds slab files but no superblock; "
                                 "refusing to guess its format")
        want = {"format_version": FORMAT_VERSION, "segment_bytes": self.segment_bytes}
        self._made += [sb, copy]
        write_superblock(sb, want)
        write_superblock(copy, want)
        self.created = True

    def _check_meta(self, sb: Path, meta: dict) -> None:
        if meta.get("format_version") == 1:
            raise SSDFormatError(
                f"{self.directory} was written by SSD format version 1 (slots without "
                f"headers); this daemon reads version {FORMAT_VERSION} and will not misread "
                "it. Its blocks are a cache: remove the directory (they are recomputed on "
                "demand) or point --ssd-dir elsewhere")
        if meta.get("format_version") != FORMAT_VERSION:
            raise SSDFormatError(
                f"{self.directory} was written by SSD format version "
                f"{meta.get('format_version')}, this daemon reads version {FORMAT_VERSION}: "
                "refusing to misread it; use another --ssd-dir or remove this one")
        seg = meta.get("segment_bytes")
        if not isinstance(seg, int) or seg <= 0 or seg % ALIGN:
            raise SSDFormatError(f"{sb}: bad segment size {seg!r}")
        if self._requested_segment and seg != self._requested_segment:
            raise SSDFormatError(
                f"{self.directory} uses segments of {seg} bytes, the configuration asks "
                f"for {self._requested_segment}: keep ssd_segment_bytes as it was (or 0)")
        self._set_geometry(seg)

    def _superblock_from_slabs(self) -> dict | None:
        """The superblock the slab files imply: every segment file is ``segment_bytes`` long,
        and at least one carries a segment header of this format. None when they do not
        agree (or nothing was ever written: then there is nothing to misread either, but
        nothing proves the format)."""
        files = sorted(self.directory.glob("seg-*.slab"))
        sizes = {p.stat().st_size for p in files}
        if len(sizes) != 1:
            return None
        seg_bytes = sizes.pop()
        if seg_bytes <= 0 or seg_bytes % ALIGN:
            return None
        for p in files:
            try:
                number = int(p.stem.split("-")[1])
                with open(p, "rb") as f:
                    raw = f.read(HEADER_BYTES)
            except (OSError, ValueError, IndexError):
                continue
            if decode_segment_header(raw, number) is not None:
                return {"format_version": FORMAT_VERSION, "segment_bytes": seg_bytes}
        return None

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self._release_files()

    def _release_files(self) -> None:
        for s in self.segments:
            os.close(s.fd)
        self.segments = []
        if getattr(self, "_lock_fd", None) is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- slot allocation ---------------------------------------------------------------------
    def assign_segment(self, number: int, slot_bytes: int) -> bool:
        """Give segment ``number`` to a size class (replay of the journal); False if out of range."""
        if number >= len(self.segments):
            return False
        seg = self.segments[number]
        if seg.slot_bytes == 0:
            n = slots_per_segment(self.segment_bytes, slot_bytes)
            seg.slot_bytes = slot_bytes
            seg.owner = np.full(n, -1, dtype=np.int64)
            seg.seq = np.zeros(n, dtype=np.uint64)
            seg.free = list(range(n - 1, -1, -1))
        return seg.slot_bytes == slot_bytes

    def reassign_segment(self, number: int, slot_bytes: int) -> None:
        """Hand an emptied segment (every slot free) to another size class."""
        seg = self.segments[number]
        if (seg.owner >= 0).any():
            raise ValueError(f"segment {number} still holds blocks")
        seg.slot_bytes = 0
        self.assign_segment(number, slot_bytes)
        self._write_segment_header(seg)
        self.counters.segments_reassigned += 1

    def _write_segment_header(self, seg: Segment) -> None:
        """Record the segment's slot size in the file itself (scan reads it when the journal is
        lost). Its sequence number outdates every slot header written under the old size."""
        buf = self._header_buf()
        buf[:] = encode_segment_header(seg.number, seg.slot_bytes,
                                       self.next_seq()).ljust(HEADER_BYTES, b"\0")
        n = os.pwritev(seg.fd, [memoryview(buf)], 0)
        if n != HEADER_BYTES:
            raise OSError(errno.EIO, f"short segment header write of {n} bytes")

    def take_segment(self, slot_bytes: int) -> int | None:
        """An unassigned segment for this class, assigned now; None when every one is taken."""
        if not slots_per_segment(self.segment_bytes, slot_bytes):
            return None
        for seg in self.segments:
            if seg.slot_bytes == 0:
                if not slots_per_segment(self.segment_bytes, slot_bytes):
                    return None
                self.assign_segment(seg.number, slot_bytes)
                self._write_segment_header(seg)
                return seg.number
        return None

    def allocate(self, slot_bytes: int) -> int | None:
        """Address of a free slot of this size in an already assigned segment, or None."""
        for seg in self.segments:
            if seg.slot_bytes == slot_bytes and seg.free:
                return (seg.number << SLOT_BITS) | seg.free.pop()
        return None

    def rebuild_free_lists(self) -> None:
        """After recovery set owners directly: free slots are those without one (lowest first);
        slots reserved for the load (reserve_slots) and never restored become free."""
        for seg in self.segments:
            if seg.slot_bytes:
                seg.owner[seg.owner < 0] = -1
                seg.free = np.flatnonzero(seg.owner < 0)[::-1].tolist()

    def reserve_slots(self, addrs: np.ndarray) -> None:
        """While the index loads: keep these slots (the ones it will restore) off the free
        lists, so a block written meanwhile never lands in a slot a journaled block still
        claims. rebuild_free_lists ends the reservation."""
        addrs = np.asarray(addrs, dtype=np.int64)
        seg_no = addrs >> SLOT_BITS
        for n in np.unique(seg_no).tolist():
            self.segments[n].owner[addrs[seg_no == n] & ((1 << SLOT_BITS) - 1)] = RESERVED
        for seg in self.segments:
            if seg.slot_bytes:
                seg.free = np.flatnonzero(seg.owner == -1)[::-1].tolist()

    def set_owner(self, addr: int, block_id: int) -> None:
        self.segments[addr >> SLOT_BITS].owner[addr & ((1 << SLOT_BITS) - 1)] = block_id

    def set_owners(self, addrs: np.ndarray, block_ids: np.ndarray) -> None:
        """set_owner for many slots at once (recovery)."""
        addrs = np.asarray(addrs, dtype=np.int64)
        seg_no = addrs >> SLOT_BITS
        slot = addrs & ((1 << SLOT_BITS) - 1)
        for n in np.unique(seg_no).tolist():
            mine = seg_no == n
            self.segments[n].owner[slot[mine]] = block_ids[mine]

    def seq_of(self, addrs: np.ndarray) -> np.ndarray:
        """Sequence numbers of the blocks in these slots (as their headers say)."""
        addrs = np.asarray(addrs, dtype=np.int64)
        out = np.zeros(len(addrs), dtype=np.uint64)
        seg_no = addrs >> SLOT_BITS
        # One sort by segment instead of a mask over every address per segment.
        order = np.argsort(seg_no, kind="stable")
        segs, starts = np.unique(seg_no[order], return_index=True)
        for n, a, b in zip(segs.tolist(), starts.tolist(), [*starts[1:].tolist(), len(order)]):
            sel = order[a:b]
            out[sel] = self.segments[n].seq[addrs[sel] & ((1 << SLOT_BITS) - 1)]
        return out

    def set_seq(self, addrs: np.ndarray, seqs: np.ndarray) -> None:
        """Recovery: the sequence numbers of restored blocks (kept for compaction)."""
        addrs = np.asarray(addrs, dtype=np.int64)
        seg_no = addrs >> SLOT_BITS
        for n in np.unique(seg_no).tolist():
            sel = seg_no == n
            self.segments[n].seq[addrs[sel] & ((1 << SLOT_BITS) - 1)] = seqs[sel]
        if len(seqs):
            self.observe_seq(int(np.max(seqs)))

    def free(self, addr: int) -> None:
        seg = self.segments[addr >> SLOT_BITS]
        slot = addr & ((1 << SLOT_BITS) - 1)
        seg.owner[slot] = -1
        seg.free.append(slot)

    def owners(self, slot_bytes: int) -> np.ndarray:
        parts = [s.owner[s.owner >= 0] for s in self.segments if s.slot_bytes == slot_bytes]
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)

    def sample_owners(self, slot_bytes: int, k: int, rng: np.random.Generator) -> np.ndarray:
        """Block ids in up to k distinct slots of this size, drawn at random (all of them when
        the class has at most k slots); free slots omitted."""
        segs = [s for s in self.segments if s.slot_bytes == slot_bytes]
        sizes = np.array([len(s.owner) for s in segs], dtype=np.int64)
        total = int(sizes.sum()) if len(segs) else 0
        if total <= k:
            return self.owners(slot_bytes)
        picks = np.unique(rng.integers(0, total, k))
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        seg_of = np.searchsorted(starts, picks, side="right") - 1
        out = np.empty(len(picks), dtype=np.int64)
        for i, seg in enumerate(segs):
            sel = seg_of == i
            out[sel] = seg.owner[picks[sel] - starts[i]]
        return out[out >= 0]

    def slot_bytes_of(self, addr: int) -> int:
        return self.segments[addr >> SLOT_BITS].slot_bytes

    def used_bytes(self) -> int:
        """Bytes of slots not on a free list, their headers included (the same measure as
        capacity_bytes; cheap: stats sample it every second)."""
        return sum((s.slot_bytes + HEADER_BYTES) * (len(s.owner) - len(s.free))
                   for s in self.segments if s.slot_bytes)

    # -- I/O (run these in self.pool) --------------------------------------------------------
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
        seg.seq[addr & _SLOT_MASK] = seq

    def write_header(self, addr: int, key: bytes, nbytes: int, csum: int, tag: bytes = b"") -> None:
        """Write only a slot's header (a path that writes the payload itself: GDS)."""
        seg = self.segments[addr >> SLOT_BITS]
        hdr = self._fill_header(addr, key, nbytes, csum, seg, tag)
        off = slot_offset(addr & ((1 << SLOT_BITS) - 1), seg.slot_bytes)
        if os.pwritev(seg.fd, [hdr], off) != HEADER_BYTES:
            raise OSError(errno.EIO, "short slot header write")

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
        got = os.pwritev(seg.fd, iov, slot_offset(writes[0][0] & _SLOT_MASK, seg.slot_bytes))
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

    # -- rebuilding the index from the slab files ------------------------------------------------
    def scan(self, known_slot_bytes: dict[int, int] | None = None
             ) -> tuple[list[ScannedSlot], dict]:
        """Read every slot header of every segment (one 4 KiB read per slot, the segments in
        parallel on the I/O pool; payloads are not read) and return the slots whose header
        verifies, plus figures. A segment's slot size comes from its own header, else from
        ``known_slot_bytes`` (the journal's SEG records); a segment with neither is skipped.
        Assigns the segments it finds. Run only when the journal is missing or damaged."""
        known = known_slot_bytes or {}
        t0 = time.monotonic()

        def one(seg: Segment):
            buf = mmap.mmap(-1, HEADER_BYTES)
            view = memoryview(buf)
            try:
                head = decode_segment_header(view[:os.preadv(seg.fd, [view], 0)], seg.number)
                slot_bytes, seg_seq = head if head else (known.get(seg.number, 0), 0)
                if not slot_bytes or not slots_per_segment(self.segment_bytes, slot_bytes):
                    return slot_bytes, [], 0
                found = []
                n = slots_per_segment(self.segment_bytes, slot_bytes)
                for slot in range(n):
                    got = os.preadv(seg.fd, [view], slot_offset(slot, slot_bytes))
                    s = decode_slot_header(view[:got], (seg.number << SLOT_BITS) | slot,
                                           slot_bytes)
                    # Older than the segment's assignment: left over from another slot size.
                    if s is not None and s.seq > seg_seq:
                        found.append(s)
                return slot_bytes, found, n
            finally:
                view.release()
                buf.close()

        results = list(self.pool.map(one, self.segments))
        found, headers_read, segments = [], 0, 0
        for seg, (slot_bytes, slots, n) in zip(self.segments, results):
            if slot_bytes and n and self.assign_segment(seg.number, slot_bytes):
                segments += 1
                headers_read += n
                found += slots
        for s in found:
            self.observe_seq(s.seq)
        return found, {"segments": segments, "headers_read": headers_read,
                       "slots_found": len(found), "seconds": time.monotonic() - t0}


def each_slot(op, items) -> list:
    """op(*item) for each item, sequentially in this thread (one pool task runs a group of
    slots); each result is op's, or the OSError it raised — one slot's failure is its own."""
    return [_attempt(op, item) for item in items]


def _attempt(op, item):
    try:
        return op(*item)
    except OSError as exc:
        return exc


_SLOT_MASK = (1 << SLOT_BITS) - 1
_MAX_RUN = 256       # slots per vectored call: two iovecs each, under IOV_MAX (1024)


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


def _raise_fd_limit(needed: int) -> None:
    """One descriptor per segment file: lift the soft limit toward the hard one if needed."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        new = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
