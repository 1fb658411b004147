"""The HBM tier: a pool of GPU memory owned by the daemon and shared with clients by CUDA IPC.

A block in HBM is a *copy*: the tier never holds a block's only copy (DRAM or SSD always has it),
so an HBM eviction is just freeing the slot — the block is "demoted" to the DRAM/SSD copy it
already has, with no copy on the eviction path — and a client that cannot read HBM (CPU tensors,
a remote client) never meets a block it cannot read. docs/decisions.md #17 says why.

How blocks get there (the daemon never copies block bytes into HBM itself; clients do, the way
they write DRAM slots for a put):

* a get by a client that opened the pool (``want_hbm``) of a block that is in DRAM but not HBM
  comes with an HBM slot to fill: after its host→device copy, the client copies the block from
  its own output buffer into that slot (device→device) and releases the lease with
  ``hbm_filled``; only then is the copy visible. The fill slots of a lease that expired or
  whose session ended stay quarantined until the client can no longer write them, like an
  aborted allocation's DRAM slots (kvstore.store.writers).
* with GPUDirect Storage (kvikio on a CUDA host) SSD-only blocks are read straight from the slab
  files into HBM slots by the daemon (kvstore.tiers.ssd.tier.SSDTier.fetch), skipping the host
  bounce.

Backends: ``cuda`` (torch allocates the pool on one device and exports it with
``UntypedStorage._share_cuda_``; clients open it with ``_new_shared_cuda``) and ``host``, a
shared-memory file mapped like the arena: the same protocol and bookkeeping on a machine without
a GPU, which is what the CPU tests run. A ``host`` pool gives no speed-up over DRAM; it exists so
the tier's logic is exercised end to end everywhere.
"""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import numpy as np

from kvstore.core.arena import Arena
from kvstore.core.shmfile import remove_orphans
from kvstore.events.media import MEDIUM_GPU
from kvstore.metrics.counters import TierCounters
from kvstore.policies.eviction import EvictionPolicy, PrefixAwareLRU
from kvstore.tiers.base import COMMITTED, QUARANTINED
from kvstore.tiers.dram import SlabAllocator, make_room, slab_stats_row
from kvstore.v1 import kvstore_pb2 as pb

log = logging.getLogger("kvstore.hbm")

HOST_POOL_PREFIX = "kvstorehbm"
BACKENDS = ("cuda", "host")


class HBMUnavailable(RuntimeError):
    """The configured HBM pool cannot be created here (no CUDA, bad device)."""


class HostPool:
    """The ``host`` backend: pool bytes in a shared-memory file (no GPU)."""

    backend = "host"

    def __init__(self, size_bytes: int, directory: Path | None = None):
        for p in remove_orphans(directory, prefix=HOST_POOL_PREFIX):
            log.info("removed stale HBM host pool %s of a daemon that is gone", p)
        self.arena = Arena.create(size_bytes, directory, prefix=HOST_POOL_PREFIX)
        self.size_bytes = self.arena.size_bytes
        self.device = "cpu"

    def info(self) -> pb.HBMPoolInfo:
        return pb.HBMPoolInfo(backend="host", size_bytes=self.size_bytes,
                              path=str(self.arena.path), uuid=self.arena.uuid)

    def host_slot(self, offset: int, nbytes: int) -> memoryview:
        """A writable view of one slot (the SSD tier reads into it directly)."""
        return self.arena.buffer[offset:offset + nbytes]

    def copy_from_host(self, copies: list[tuple[int, memoryview]]) -> None:
        """Write each host view into the pool at its offset (blocking)."""
        for off, src in copies:
            self.arena.buffer[off:off + len(src)] = src

    def close(self) -> None:
        self.arena.close()


class CudaPool:
    """The ``cuda`` backend: one device allocation, exported by CUDA IPC."""

    backend = "cuda"

    def __init__(self, size_bytes: int, device: str = "cuda:0"):
        try:
            import torch
        except ImportError:
            raise HBMUnavailable("the HBM tier needs torch with CUDA in the daemon "
                                 "(pip install 'kvstore-offload[hbm]')") from None
        if not torch.cuda.is_available():
            raise HBMUnavailable(
                f"hbm_bytes is set but CUDA is not available (torch {torch.__version__}, "
                f"{'CPU-only build' if not torch.backends.cuda.is_built() else 'no visible device'}"
                "); set hbm_bytes = 0, or hbm_device = \"host\" to run the tier's protocol on "
                "shared memory")
        try:
            dev = torch.device(device)
            if dev.type != "cuda":
                raise ValueError
            idx = dev.index if dev.index is not None else torch.cuda.current_device()
            props = torch.cuda.get_device_properties(idx)
        except (ValueError, RuntimeError, AssertionError) as exc:
            raise HBMUnavailable(f"hbm_device {device!r} is not a usable CUDA device "
                                 f"({torch.cuda.device_count()} visible): {exc}") from None
        try:
            self.tensor = torch.empty(size_bytes, dtype=torch.uint8, device=idx)
        except torch.cuda.OutOfMemoryError as exc:
            raise HBMUnavailable(f"cannot allocate a {size_bytes}-byte HBM pool on cuda:{idx}: "
                                 f"{exc}") from None
        torch.cuda.synchronize(idx)
        self._torch = torch
        self.device = f"cuda:{idx}"
        self.device_uuid = _uuid_str(props)
        self.size_bytes = size_bytes
        self._share = self.tensor.untyped_storage()._share_cuda_()
        self._stream = None
        self._pin = None       # kvstore.core.pinning.ChunkedRegistration of the DRAM arena
        log.info("HBM pool: %d bytes on %s (%s, %s) exported by CUDA IPC", size_bytes,
                 self.device, props.name, self.device_uuid)

    def info(self) -> pb.HBMPoolInfo:
        dev, handle, storage_bytes, storage_off, ref_h, ref_off, ev_h, ev_sync = self._share
        return pb.HBMPoolInfo(
            backend="cuda", size_bytes=self.size_bytes, device_uuid=self.device_uuid,
            ipc_device=int(dev), ipc_handle=bytes(handle), ipc_storage_bytes=int(storage_bytes),
            ipc_storage_offset=int(storage_off), ipc_ref_counter_handle=bytes(ref_h or b""),
            ipc_ref_counter_offset=int(ref_off), ipc_event_handle=bytes(ev_h or b""),
            ipc_event_sync_required=bool(ev_sync))

    def slot_tensor(self, offset: int, nbytes: int):
        """A device view of one slot (kvikio reads into it)."""
        return self.tensor[offset:offset + nbytes]

    def copy_from_host(self, copies: list[tuple[int, memoryview]]) -> None:
        """H2D copies of host views (DRAM arena slots) into the pool, on this pool's own
        stream; returns once they are complete. DMA from the part of the arena pin_host has
        pinned so far, staged by the driver elsewhere (as correct, slower)."""
        import numpy as np
        torch = self._torch
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=self.device)
        with torch.cuda.stream(self._stream):
            for off, src in copies:
                host = torch.from_numpy(np.frombuffer(src, dtype=np.uint8))
                self.tensor[off:off + len(src)].copy_(host, non_blocking=True)
        self._stream.synchronize()

    def pin_host(self, arena) -> None:
        """Register the daemon's DRAM arena as pinned memory so copy_from_host is DMA: in
        chunks, on a thread of its own, while the daemon serves (kvstore.core.pinning; a
        whole large arena took seconds before the daemon listened)."""
        import numpy as np
        from kvstore.core.pinning import ChunkedRegistration
        rt = self._torch.cuda.cudart()
        ptr = np.frombuffer(arena.buffer, dtype=np.uint8).ctypes.data
        self._pin = ChunkedRegistration(ptr, arena.size_bytes,
                                        lambda p, n: rt.cudaHostRegister(p, n, 1),
                                        rt.cudaHostUnregister, name="kvstore-pin-dram",
                                        what="the DRAM arena (HBM prefetch copies)")

    def close(self) -> None:
        """Free the pool; unregister the arena (call before the arena is unmapped)."""
        if self._stream is not None:
            self._stream.synchronize()
        if self._pin is not None:
            self._pin.close()
            self._pin = None
        self.tensor = None


def _uuid_str(props) -> str:
    u = getattr(props, "uuid", None)
    if u is None:
        return ""
    s = str(u)
    return s if s.startswith("GPU-") else f"GPU-{s}"


def open_pool(size_bytes: int, device: str, shm_dir: Path | None = None):
    """The daemon's pool for ``hbm_device`` ("cuda", "cuda:N" or "host")."""
    if device == "host":
        return HostPool(size_bytes, shm_dir)
    return CudaPool(size_bytes, device)


class HBMTier:
    """Slot bookkeeping of the pool: which blocks have an HBM copy, which slots are being filled.

    Runs on the daemon's event loop like the store (no locks). Owns ``slot`` (block id → offset
    of a ready copy) and ``filling`` (block id → offset a client or the SSD tier is copying into);
    reads block state from the table it is given, DRAM bytes from the DRAM tier.
    """

    name = "HBM"

    def __init__(self, pool, table, dram, chunk_bytes: int,
                 eviction: EvictionPolicy | None = None):
        self.pool = pool
        self.table = table
        self.dram = dram
        self.eviction = eviction or PrefixAwareLRU()
        self.slabs = SlabAllocator(pool.size_bytes, min(chunk_bytes, max(4096, pool.size_bytes // 4)))
        self._slot: dict[int, int] = {}
        self._filling: dict[int, int] = {}
        self.counters = TierCounters()

    # -- reading ---------------------------------------------------------------------------
    def has(self, bid: int) -> bool:
        """The block has a ready HBM copy."""
        return bid in self._slot

    def copies(self) -> list[int]:
        """Blocks with a ready HBM copy (a KV-event snapshot's GPU part)."""
        return list(self._slot)

    def offset(self, bid: int) -> int:
        return self._slot.get(bid, -1)

    def is_filling(self, bid: int) -> bool:
        return bid in self._filling

    def dest(self, offset: int, nbytes: int):
        """Where the daemon itself writes one slot: a host view (host pool) or a device tensor
        (CUDA pool, for kvikio)."""
        if self.pool.backend == "host":
            return self.pool.host_slot(offset, nbytes)
        return self.pool.slot_tensor(offset, nbytes)

    # -- filling ---------------------------------------------------------------------------
    def _bytes_of(self, bid: int, slot: bool = True) -> int:
        layout = self.table.namespace_of(bid).layout
        return layout.slot_bytes if slot else layout.block_bytes

    def reserve(self, bids: list[int]) -> list[int]:
        """An HBM slot for each block (-1 where none could be freed); the slots become the
        blocks' copies at :meth:`finish` with ok=True (or :meth:`adopt`). The blocks must be
        pinned."""
        out = []
        by_class: dict[int, int] = {}
        for bid in bids:
            sb = self._bytes_of(bid)
            by_class[sb] = by_class.get(sb, 0) + 1
        for sb, n in by_class.items():
            self._make_room(sb, n)
        for bid in bids:
            off = self.slabs.allocate(self._bytes_of(bid)) if bid not in self._filling else None
            if off is None:
                out.append(-1)
                continue
            self.slabs.set_owner(off, bid)
            self._filling[bid] = off
            out.append(off)
        return out

    def cancel_fill(self, bid: int, off: int) -> None:
        """A reserved slot that will not be filled: freed."""
        if self._filling.get(bid) == off:
            del self._filling[bid]
        self.slabs.free(off)

    def finish(self, fills: dict[int, int], ok: bool, quarantine: list | None = None) -> int:
        """End a lease's fills: publish them (ok) or free their slots; returns copies made.
        With ``quarantine`` (an expired lease whose client lives) the slots are parked there
        instead: the client may still be writing into them."""
        state = self.table.state
        made = 0
        for bid, off in fills.items():
            if self._filling.get(bid) == off:
                del self._filling[bid]
            if ok and state[bid] == COMMITTED and bid not in self._slot:
                self._slot[bid] = off
                self.table.report_copy(MEDIUM_GPU, bid, stored=True)
                self.counters.promotions += 1
                self.counters.bytes_in += self._bytes_of(bid, slot=False)
                made += 1
            elif quarantine is not None:
                self.slabs.set_owner(off, QUARANTINED)
                quarantine.append(off)
            else:
                self.slabs.free(off)
        return made

    def adopt(self, bid: int, off: int) -> None:
        """A slot the daemon filled itself (an SSD read, a prefetch copy) becomes the block's
        copy."""
        if self._filling.get(bid) == off:
            del self._filling[bid]
        self._slot[bid] = off
        self.table.report_copy(MEDIUM_GPU, bid, stored=True)
        self.counters.promotions += 1
        self.counters.bytes_in += self._bytes_of(bid, slot=False)

    async def copy_in(self, bids: list[int]) -> int:
        """Copy these committed DRAM blocks into HBM (a prefetch with to_hbm); returns the
        copies made. The copy pins its own sources for its whole duration: whoever asked
        (a prefetch) may end meanwhile — a get reads the blocks, a cancel, an expiry — and
        an unpinned block's DRAM slot could be evicted and reused under the copy, whose torn
        bytes would then become the block's HBM copy. The destination slots are this copy's
        (reserved, so no one else fills or evicts them) until it adopts or frees them."""
        state, dram = self.table.state, self.table.dram
        bids = [b for b in bids if b not in self._slot and b not in self._filling
                and state[b] == COMMITTED and dram[b] >= 0]
        if not bids:
            return 0
        self.table.pin(bids)
        try:
            offs = self.reserve(bids)
            todo = [(b, o) for b, o in zip(bids, offs) if o >= 0]
            copies = [(o, self.dram.view(int(dram[b]), self._bytes_of(b, slot=False)))
                      for b, o in todo]
            ok = False
            try:
                await asyncio.get_running_loop().run_in_executor(None, self.pool.copy_from_host,
                                                                 copies)
                ok = True
            except Exception as exc:     # a failed staging costs only speed: the get reads DRAM
                log.warning("copying %d blocks into HBM failed: %s", len(todo), exc)
            made = 0
            for b, o in todo:
                # a block deleted meanwhile is not COMMITTED: its copy is dropped (the unpin
                # below then frees the block in every tier)
                if ok and state[b] == COMMITTED:
                    self.adopt(b, o)
                    made += 1
                else:
                    self.cancel_fill(b, o)
            return made
        finally:
            self.table.unpin(bids)

    def count_get(self, hits: int, misses: int, bytes_out: int) -> None:
        """One get: blocks served from HBM, blocks asked for and not served there, bytes."""
        self.counters.count_get(hits, misses, bytes_out)

    def free_quarantined(self, offsets: list[int]) -> None:
        for off in offsets:
            self.slabs.free(off)

    def slot_bytes(self, offset: int) -> int:
        return self.slabs.slot_bytes(offset)

    # -- dropping and eviction -------------------------------------------------------------
    def forget(self, bid: int) -> None:
        """Forget a block's HBM copy (the block is gone from the store)."""
        off = self._slot.pop(bid, None)
        if off is not None:
            self.table.report_copy(MEDIUM_GPU, bid, stored=False)
            self.slabs.free(off)

    def _evictable(self, slot_bytes: int) -> np.ndarray:
        owners = self.slabs.owners(slot_bytes)
        if not len(owners):
            return owners
        ready = np.fromiter((self._slot.get(int(b), -1) >= 0 for b in owners), dtype=bool,
                            count=len(owners))
        return owners[ready & (self.table.leases[owners] == 0)]

    def _evict(self, victims) -> None:
        for bid in victims:
            self.slabs.free(self._slot.pop(int(bid)))
            self.table.report_copy(MEDIUM_GPU, int(bid), stored=False)
        self.counters.evictions += len(victims)
        self.counters.demotions += len(victims)

    def _make_room(self, slot_bytes: int, n_needed: int) -> None:
        make_room(self.slabs, lambda c: self.eviction.order(self.table, c), slot_bytes,
                  n_needed, self._evictable, self._evict)

    # -- kvstore.tiers.base.Tier -----------------------------------------------------------
    def capacity_bytes(self) -> int:
        return self.slabs.capacity_bytes

    def used_bytes(self) -> int:
        return self.slabs.used_bytes()

    def blocks(self) -> int:
        return len(self._slot)

    def stats_row(self):
        return slab_stats_row(pb.TIER_HBM, self.slabs, self.blocks(), self.counters)

    def close(self) -> None:
        self.pool.close()
