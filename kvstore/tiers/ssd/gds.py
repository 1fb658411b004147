"""GPUDirect Storage for the SSD tier through kvikio (optional: the ``gds`` extra, CUDA only).

``KvikioSlotIO`` has the slot I/O interface of :class:`kvstore.tiers.ssd.files.SlabFiles`
(``write_slot`` / ``read_slot``: whole slots, same addresses, same key-seeded xxh3-64
checksums), but moves bytes between the slab files and CUDA device buffers (torch CUDA tensors,
or anything kvikio accepts) with ``kvikio.CuFile``: true GDS DMA where the driver supports it,
kvikio's compatibility mode (POSIX through a bounce buffer) otherwise. A block written through
one path reads back through the other.

Checksums need the bytes on the host: the device path verifies by copying the block to host
memory after the DMA. That costs one D2H copy per read and keeps the rule "nothing corrupt is
ever served" on the GPU path too.

Status: written against kvikio's documented API (CuFile.pread/pwrite returning futures) and
covered by tests marked ``gpu``; it has not been run on a GPU host yet. ``available()`` is false
without CUDA or kvikio, and the host path (O_DIRECT + thread pool) is then the only one used.
"""
from __future__ import annotations

import errno
import logging

from kvstore.tiers.ssd.files import SlabFiles
from kvstore.tiers.ssd.format import block_checksum
from kvstore.tiers.ssd.slotio import each_slot

log = logging.getLogger("kvstore.gds")


def available() -> bool:
    """True when kvikio imports and a CUDA device is present."""
    try:
        import kvikio  # noqa: F401
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _host_bytes(buf, nbytes: int):
    """The first nbytes of a device buffer, copied to host memory (for the checksum)."""
    import torch
    if isinstance(buf, torch.Tensor):
        return buf.reshape(-1).view(torch.uint8)[:nbytes].cpu().numpy()
    import cupy  # kvikio's own buffers are cupy arrays
    return cupy.asnumpy(buf.ravel().view(cupy.uint8)[:nbytes])


class KvikioSlotIO:
    """Slot reads/writes of an open SlabFiles's files straight to/from GPU memory."""

    def __init__(self, ssd: SlabFiles):
        import kvikio
        self.slabs = ssd
        self.compat_mode = bool(kvikio.defaults.is_compat_mode_preferred()) \
            if hasattr(kvikio.defaults, "is_compat_mode_preferred") else None
        self._files = [kvikio.CuFile(ssd.directory / f"seg-{s.number:05d}.slab", "r+")
                       for s in ssd.segments]
        log.info("GDS: kvikio on %d segment files (%s)", len(self._files),
                 "compatibility mode" if self.compat_mode else "GPUDirect")

    def _where(self, addr: int):
        """(file, payload offset, slot bytes): the payload follows the slot header."""
        seg, off = self.slabs.payload_offset(addr)
        return self._files[seg.number], off, seg.slot_bytes

    def write_slot(self, addr: int, dev_buf, key: bytes, nbytes: int, tag: bytes = b"") -> int:
        """Write one slot from a device buffer of slot_bytes (the payload by DMA, then its
        header from the host, as SlabFiles.write_slot lays it out); returns the checksum."""
        f, off, slot_bytes = self._where(addr)
        csum = block_checksum(_host_bytes(dev_buf, nbytes), key)
        n = f.pwrite(dev_buf, slot_bytes, off).get()
        if n != slot_bytes:
            raise OSError(errno.EIO, f"short GDS write of {n}/{slot_bytes} bytes")
        self.slabs.write_header(addr, key, nbytes, csum, tag)
        self.slabs.count_write(n)
        return csum

    def read_slot(self, addr: int, dev_buf, key: bytes, nbytes: int, csum: int) -> bool:
        """Read one slot into a device buffer; True iff it verifies against ``csum``."""
        f, off, slot_bytes = self._where(addr)
        n = f.pread(dev_buf, slot_bytes, off).get()
        self.slabs.count_read(n)
        return n == slot_bytes and block_checksum(_host_bytes(dev_buf, nbytes), key) == csum

    def read_slots(self, reads) -> list:
        """read_slot for each (addr, device view, key, nbytes, csum), sequentially in this
        thread; results as SlabFiles.read_slots (True/False, or the OSError raised)."""
        return each_slot(self.read_slot, reads)

    def close(self) -> None:
        for f in self._files:
            f.close()
        self._files = []
