"""The SSD tier's slab files: a directory of preallocated files with fixed-size slots.

``SlabFiles`` owns the directory: the lock (one daemon per directory), the superblock and its
copy (checked, repaired or rebuilt), the up-front free-space check, the preallocation of every
segment file (O_DIRECT where the filesystem allows it, buffered with a log line otherwise), and
the clean-up of a start that failed. The rest is composed of one-purpose parts:

    kvstore.tiers.ssd.allocator   which slot holds which block (SlotAllocator, Segment)
    kvstore.tiers.ssd.slotio      moving slots between files and buffers (SlotIO, SSDCounters)
    kvstore.tiers.ssd.scan        rebuilding the index from the slot headers
    kvstore.tiers.ssd.format      the on-disk format (layout, superblock, headers, checksum)

Giving a segment to a size class (take_segment, reassign_segment) is both the allocator's
bookkeeping and a segment header written in the file, so it lives here.
"""
from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

from kvstore.core import lockfile
from kvstore.core.directio import direct_io_works
from kvstore.core.units import format_bytes
from kvstore.tiers.ssd.allocator import Segment, SlotAllocator
from kvstore.tiers.ssd.format import (ALIGN, FORMAT_VERSION, HEADER_BYTES, SUPERBLOCK_COPY,
                                      SSDFormatError, ScannedSlot, auto_segment_bytes,
                                      checksum_releases_gil, decode_segment_header,
                                      read_superblock, slots_per_segment, write_superblock)
from kvstore.tiers.ssd.scan import scan_slab_files
from kvstore.tiers.ssd.slotio import SlotIO

log = logging.getLogger("kvstore.ssd")


class SSDSpaceError(OSError):
    """The filesystem has less free space than the slab files still need (checked before any
    is preallocated); ``need_bytes`` and ``free_bytes`` say by how much."""

    def __init__(self, message: str, need_bytes: int, free_bytes: int):
        super().__init__(errno.ENOSPC, message)
        self.need_bytes = need_bytes
        self.free_bytes = free_bytes


class SlabFiles(SlotAllocator, SlotIO):
    """Slab files under ``directory``. Create with :meth:`open` (recovers an existing directory)."""

    def __init__(self, directory: Path, capacity_bytes: int, segment_bytes: int = 0,
                 io_threads: int = 8, direct: bool = True, read_limiter=None):
        """segment_bytes 0: the directory's own segment size, or for a new directory about
        1/64 of the capacity (64 MiB .. 16 GiB): few files even at many TiB."""
        self.directory = Path(directory)
        self._requested_capacity = capacity_bytes
        self._requested_segment = segment_bytes // ALIGN * ALIGN
        self._set_geometry(self._requested_segment or auto_segment_bytes(capacity_bytes))
        self._init_allocator()
        self._init_io(io_threads, read_limiter)
        self.want_direct = direct
        self.direct = False
        self.created = False                 # open() made a new directory (nothing to recover)
        self._made: list[Path] = []          # files this open() created (discard_created)
        self._made_dirs: list[Path] = []     # directories it created, outermost first

    def _set_geometry(self, segment_bytes: int) -> None:
        self.segment_bytes = max(ALIGN, segment_bytes)
        self.n_segments = max(1, self._requested_capacity // self.segment_bytes)

    @property
    def capacity_bytes(self) -> int:
        return self.n_segments * self.segment_bytes

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
        log.info("SSD tier: block checksums by %s", "the system libxxhash (interpreter lock "
                 "released)" if checksum_releases_gil() else "python-xxhash (install libxxhash0 "
                 "to hash without holding the interpreter lock)")
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

    # -- giving segments to size classes -----------------------------------------------------
    def reassign_segment(self, number: int, slot_bytes: int) -> None:
        """Hand an emptied segment (every slot free) to another size class."""
        seg = self.segments[number]
        if (seg.owner >= 0).any():
            raise ValueError(f"segment {number} still holds blocks")
        seg.slot_bytes = 0
        self.assign_segment(number, slot_bytes)
        self._write_segment_header(seg)
        self.counters.segments_reassigned += 1

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

    # -- rebuilding the index from the slab files ------------------------------------------------
    def scan(self, known_slot_bytes: dict[int, int] | None = None
             ) -> tuple[list[ScannedSlot], dict]:
        """kvstore.tiers.ssd.scan.scan_slab_files over these files."""
        return scan_slab_files(self, known_slot_bytes)


def _raise_fd_limit(needed: int) -> None:
    """One descriptor per segment file: lift the soft limit toward the hard one if needed."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        new = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
