"""The shared-memory arena: the bytes of the DRAM tier, mapped by the daemon and its clients.

The daemon creates one file under /dev/shm (mode 0600) and writes a header with a random UUID. A
same-host client maps the same file and checks the UUID against the one the daemon sent over
gRPC: a stale file of an earlier daemon is refused, and the client falls back to streaming bytes
over gRPC.

Preparation. Memory is usable only once it is *reserved* (fallocate: tmpfs allocates the pages
without touching them, so a later write can never hit SIGBUS for want of memory); it is fast to
copy into only once it is *populated* (page tables built and the pages cleared, which on a host
whose memory was never touched runs at well under 1 GB/s). :meth:`Arena.create` does both before
it returns; the daemon instead creates the arena with ``prepare_later=True`` (only the header
page reserved, the file sized, nothing populated), starts serving, and lets an
:class:`ArenaPreparer` thread reserve the data region piece by piece in address order and then
populate it. The slab allocator hands out only chunks below :attr:`ArenaPreparer.reserved_bytes`.
The header records how much is populated, so a client that attaches meanwhile populates its own
mapping of that much only (the rest faults in on first use) instead of doing the daemon's work.

Offsets handed out by the daemon are relative to the start of the file; the data region starts
after a 4 KiB header page. The file itself (creation, mode, mapping, removal, orphans of
killed daemons) is kvstore.core.shmfile's.
"""
from __future__ import annotations

import ctypes
import logging
import os
import struct
import threading
import time
import uuid as uuidlib
from pathlib import Path
from typing import Callable

from kvstore.core.shmfile import ShmFile, arena_path, default_shm_dir, free_bytes, populate_flag
from kvstore.core.units import format_bytes

log = logging.getLogger("kvstore.core.arena")

HEADER_BYTES = 4096
_MAGIC = b"KVSTARN1"
_HEADER = struct.Struct("<8s16sQQ")  # magic, uuid, total size, owner pid
# Right after the header: bytes from the start of the file that the daemon has populated. Older
# readers ignore it; the data region and its offsets are unchanged.
_POPULATED = struct.Struct("<Q")
_MADV_POPULATE_WRITE = 23            # Linux >= 5.14


def _libc_madvise():
    """libc's madvise through ctypes: ctypes drops the GIL during the call (mmap.madvise does
    not), so populating gigabytes never stalls the daemon's event loop. None if unavailable."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_madvise = _libc_madvise()


class ArenaError(RuntimeError):
    pass


class Arena:
    """A mapped arena file. Create it with :meth:`create` (daemon) or :meth:`attach` (client)."""

    def __init__(self, file: ShmFile, uuid: bytes, reserved_bytes: int):
        self.path = file.path
        self.uuid = uuid
        mm = file.mm
        self.size_bytes = len(mm)
        self.directory = file.path.parent
        self._file = file
        self._mm = mm
        self.buffer = memoryview(mm)
        # The mapping's address, for madvise; taken through a temporary export so that close()
        # is not blocked by a lingering one.
        probe = ctypes.c_char.from_buffer(mm)
        self._addr = ctypes.addressof(probe)
        del probe
        self._reserved = reserved_bytes
        # Bytes from the start of this mapping whose page tables were built at map time
        # (MAP_POPULATE or populate): a client prefaults the rest before copying (see
        # client/transfer.py ArenaView.prefault).
        self.mapped_bytes = 0

    @classmethod
    def create(cls, size_bytes: int, directory: Path | None = None, prefix: str = "kvstore",
               *, prepare_later: bool = False) -> "Arena":
        """Create the daemon's arena of ``size_bytes`` data bytes (after the header page).

        By default every page is reserved and populated before this returns. With
        ``prepare_later`` only the header page is: the caller must prepare the rest with an
        :class:`ArenaPreparer` (or :meth:`reserve`) before handing out any of it. Raises
        ArenaError when the directory cannot hold the arena (checked up front either way)."""
        directory = Path(directory) if directory else default_shm_dir()
        uid = uuidlib.uuid4().bytes
        path = arena_path(directory, prefix, uid.hex()[:8])
        total = HEADER_BYTES + size_bytes
        # The reason only: the caller knows which setting sized the arena and says what to change.
        too_big = f"cannot reserve {format_bytes(total)} for the arena in {directory}: {{}}"
        free = free_bytes(directory)
        if free is not None and free < total:
            raise ArenaError(too_big.format(f"only {format_bytes(free)} free there"))
        file = ShmFile.create(path, total, reserve_bytes=HEADER_BYTES if prepare_later else total,
                              populate=not prepare_later,
                              size_error=lambda exc: ArenaError(too_big.format(exc)))
        mm = file.mm
        mm[:_HEADER.size] = _HEADER.pack(_MAGIC, uid, total, os.getpid())
        populated = HEADER_BYTES if prepare_later else total
        mm[_HEADER.size:_HEADER.size + _POPULATED.size] = _POPULATED.pack(populated)
        return cls(file, uid, reserved_bytes=HEADER_BYTES if prepare_later else total)

    @property
    def reserved_bytes(self) -> int:
        """Bytes from the start of the file that are backed by memory (safe to hand out)."""
        return self._reserved

    def populated_bytes(self) -> int:
        """Bytes from the start of the file whose pages the daemon has populated (header)."""
        return _POPULATED.unpack_from(self._mm, _HEADER.size)[0]

    def reserve(self, offset: int, nbytes: int) -> None:
        """Back [offset, offset + nbytes) with memory (fallocate; drops the GIL). Pieces must
        come in address order, each starting where the reserved prefix ends. Raises ArenaError
        (ENOSPC, ENOMEM: the directory or the host ran out of memory)."""
        if offset != self._reserved:
            raise ArenaError(f"reserve at {offset}: the reserved prefix ends at {self._reserved}")
        try:
            os.posix_fallocate(self._file.fd, offset, nbytes)
        except OSError as exc:
            raise ArenaError(f"cannot reserve {nbytes} bytes at {offset} of the DRAM arena in "
                             f"{self.directory}: {exc}") from exc
        self._reserved = offset + nbytes

    def populate(self, offset: int, nbytes: int) -> bool:
        """Prefault [offset, offset + nbytes) of this mapping for writing without changing a
        byte (MADV_POPULATE_WRITE; drops the GIL). False where the kernel cannot (pages then
        fault in on first use). Only for reserved memory: a hole would be allocated here."""
        if _madvise is None or nbytes <= 0:
            return False
        if _madvise(self._addr + offset, nbytes, _MADV_POPULATE_WRITE) != 0:
            return False
        return True

    def mark_populated(self, end: int) -> None:
        """Record in the header that [0, end) is populated, for clients attaching later."""
        self._mm[_HEADER.size:_HEADER.size + _POPULATED.size] = _POPULATED.pack(end)

    @classmethod
    def attach(cls, path: str | Path, expected_uuid: bytes, expected_size: int) -> "Arena":
        """Map an existing arena; raises ArenaError if it is not the one the daemon described."""
        file = ShmFile.open(path, ArenaError, "arena", writable=True)
        path = file.path
        with file.closing_on_error():
            size = file.size_bytes
            if size != expected_size or size < HEADER_BYTES:
                raise ArenaError(f"arena {path} is {size} bytes, daemon said {expected_size}")
            head = file.pread(_HEADER.size + _POPULATED.size, 0)
            magic, uid, total, _pid = _HEADER.unpack_from(head)
            if magic != _MAGIC or uid != expected_uuid or total != size:
                raise ArenaError(f"arena {path} does not belong to this daemon (uuid mismatch)")
            # Populate only what the daemon already populated: beyond it the daemon is still
            # preparing, and populating here would do its slow work synchronously in the
            # client. The first copy into the rest pays its page faults instead.
            populated = min(_POPULATED.unpack_from(head, _HEADER.size)[0], size)
            whole = populated == size
            file.map(size, writable=True, populate=whole)
        arena = cls(file, uid, reserved_bytes=size)
        if whole and populate_flag():
            arena.mapped_bytes = size
        elif populated > HEADER_BYTES and arena.populate(0, populated):
            arena.mapped_bytes = populated
        return arena

    def view(self, offset: int, nbytes: int) -> memoryview:
        if offset < HEADER_BYTES or offset + nbytes > self.size_bytes:
            raise ArenaError(f"slot [{offset}, {offset + nbytes}) outside the arena")
        return self.buffer[offset:offset + nbytes]

    def close(self) -> None:
        if self._mm is None:
            return
        self.buffer.release()
        # A caller may still hold a view (e.g. a tensor over the mapping); the mapping then
        # lives on until that view is gone, the daemon's file is unlinked all the same.
        self._file.close()
        self._mm = None


class ArenaPreparer:
    """Prepares an arena made with ``prepare_later`` in one background thread: first reserves
    the data region in ``piece_bytes`` pieces in address order, calling ``on_reserved(end)``
    after each (from this thread: the callee hands it to its own thread), then populates the
    region piece by piece, recording progress in the header. Both steps are system calls that
    drop the GIL, so the daemon serves meanwhile.

    ``limit_bps`` (0: none) paces both steps, to keep preparation from crowding co-located
    engines out of memory bandwidth (and to make preparation observable in tests).
    A reservation that fails (the host ran out of memory) stops preparation: what was reserved
    stays usable, :attr:`error` says why. :meth:`stop` returns within about one piece."""

    def __init__(self, arena: Arena, piece_bytes: int, on_reserved: Callable[[int], None],
                 limit_bps: float = 0.0, clock=time.monotonic):
        self.arena = arena
        self.piece_bytes = max(4096, piece_bytes // 4096 * 4096)
        self.limit_bps = limit_bps
        self._on_reserved = on_reserved
        self._clock = clock
        self._stop = threading.Event()
        self.error: str = ""
        self.started_at = 0.0
        self.reserved_s: float | None = None     # seconds to reserve everything
        self.populated_s: float | None = None    # seconds to populate everything (after that)
        self.populate_supported = True
        self._thread = threading.Thread(target=self._run, name="kvstore-arena-prepare",
                                        daemon=True)

    @property
    def reserved_bytes(self) -> int:
        return self.arena.reserved_bytes

    @property
    def done(self) -> bool:
        return not self._thread.is_alive() and self.started_at > 0

    def start(self) -> "ArenaPreparer":
        self.started_at = self._clock()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _pieces(self, first: int):
        total = self.arena.size_bytes
        off = first
        while off < total and not self._stop.is_set():
            n = min(self.piece_bytes, total - off)
            yield off, n
            off += n

    def _pace(self, t0: float, done_bytes: int) -> None:
        if self.limit_bps > 0:
            ahead = done_bytes / self.limit_bps - (self._clock() - t0)
            if ahead > 0:
                self._stop.wait(ahead)

    def _run(self) -> None:
        arena, t0 = self.arena, self.started_at
        start = arena.reserved_bytes
        for off, n in self._pieces(start):
            try:
                arena.reserve(off, n)
            except ArenaError as exc:
                self.error = str(exc)
                log.error("DRAM arena: preparation stopped at %s of %s: %s; serving with what is "
                          "ready", format_bytes(off - HEADER_BYTES),
                          format_bytes(arena.size_bytes - HEADER_BYTES), exc)
                return
            self._on_reserved(off + n)
            self._pace(t0, off + n - start)
        if self._stop.is_set():
            return
        self.reserved_s = self._clock() - t0
        log.info("DRAM arena: full capacity (%s) reserved in %.2fs; populating its pages",
                 format_bytes(arena.size_bytes - HEADER_BYTES), self.reserved_s)
        t1 = self._clock()
        populated = HEADER_BYTES
        for off, n in self._pieces(HEADER_BYTES):
            if not arena.populate(off, n):
                self.populate_supported = False
                log.info("DRAM arena: prefaulting stopped at %s (MADV_POPULATE_WRITE: %s); the "
                         "other pages fault in on first use", format_bytes(off - HEADER_BYTES),
                         os.strerror(ctypes.get_errno()) if _madvise else "no libc madvise")
                return
            populated = off + n
            arena.mark_populated(populated)
            self._pace(t1, populated - HEADER_BYTES)
        if self._stop.is_set():
            return
        self.populated_s = self._clock() - t0
        log.info("DRAM arena prepared: %s reserved in %.2fs, pages populated by %.2fs",
                 format_bytes(arena.size_bytes - HEADER_BYTES), self.reserved_s, self.populated_s)
