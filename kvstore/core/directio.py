"""O_DIRECT: whether a filesystem honours it, found out by real I/O.

Some filesystems refuse O_DIRECT at open (EINVAL: tmpfs before Linux 6.6); some accept the flag
at open and refuse the I/O itself. Only an aligned read or write through the descriptor tells,
so that is what these probes do. Used by the SSD tier (kvstore.tiers.ssd.files: its segment
files) and by the benchmarks that measure a disk (kvstore bench ssd, kvstore bench peers).
"""
from __future__ import annotations

import errno
import mmap
import os
import tempfile
from pathlib import Path

ALIGN_BYTES = 4096                   # the alignment O_DIRECT needs of offsets, sizes, buffers
O_DIRECT = getattr(os, "O_DIRECT", 0)   # 0 where the platform has none


def direct_io_works(fd: int) -> bool:
    """A 4 KiB aligned read at offset 0 through ``fd`` (opened with O_DIRECT) succeeds: the
    filesystem honours O_DIRECT for I/O, not only at open. Call it on a file at least 4 KiB
    long (a read past the end may be answered without the check). False on EINVAL; any other
    error is raised."""
    buf = mmap.mmap(-1, ALIGN_BYTES)     # page aligned
    try:
        os.preadv(fd, [memoryview(buf)], 0)
        return True
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    finally:
        buf.close()


def directory_supports_direct_io(directory: str | Path) -> bool:
    """A new file in ``directory`` can be opened with O_DIRECT, written through it and read
    back (4 KiB, aligned); the file is removed. False where it cannot, for whatever reason
    (the caller then uses buffered I/O, or refuses the directory)."""
    if not O_DIRECT:
        return False
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".kvstore-odirect-") as f:
            fd = os.open(f.name, os.O_RDWR | O_DIRECT)
            buf = mmap.mmap(-1, ALIGN_BYTES)
            try:
                os.pwritev(fd, [memoryview(buf)], 0)
                return direct_io_works(fd)
            finally:
                buf.close()
                os.close(fd)
    except OSError:
        return False
