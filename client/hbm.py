"""The SDK's side of the HBM tier: the daemon's GPU pool opened in this process.

The daemon describes its pool in the session's first event (``SessionEvent.hbm``). ``open_pool``
maps it: a ``cuda`` pool through CUDA IPC on the device with the same UUID (the client's
CUDA_VISIBLE_DEVICES numbering may differ from the daemon's), a ``host`` pool (no GPU: the tier's
protocol on shared memory) like the arena. Either way the pool is one flat uint8 tensor, and a
get whose output lives on the pool's device asks the daemon for HBM (``want_hbm``):

* blocks with an HBM copy are copied pool → output (device to device);
* the others come from the arena as usual, and where the daemon handed out a fill slot the
  block is then copied output → pool, so the next get of it is device to device. The copies
  finish before the lease is released (``hbm_filled``); a failed fill only costs the copy.

Any failure to open the pool leaves the client on the DRAM path (one log line).
"""
from __future__ import annotations

import logging

from kvstore.core.arena import Arena
from kvstore.client import cuda, transfer

log = logging.getLogger("kvstore.client.hbm")


class PoolView:
    """The opened pool: ``tensor`` (flat uint8 on ``device``) and the copies in and out."""

    def __init__(self, tensor, backend: str, keepalive=None):
        import torch
        self._torch = torch
        self.tensor = tensor
        self.device = tensor.device
        self.backend = backend
        self._keep = keepalive          # the host pool's Arena (mapping must outlive the view)
        self._stream = None

    def serves(self, x) -> bool:
        """True when ``x`` (a get's output) is a tensor on the pool's device."""
        torch = self._torch
        return isinstance(x, torch.Tensor) and x.device == self.device

    def copy(self, rows, offsets: list[int], indices: list[int], to_pool: bool, ready=None):
        """Copy rows[i] ↔ the pool slots offsets[i] for i in indices (runs of adjacent slots
        move as one copy). CUDA: queued on a side stream after ``ready``; returns an event to
        wait on (None for the host pool, whose copies are done on return)."""
        if not indices:
            return None
        bb = rows.shape[1]
        if self.backend == "host":
            transfer.copy_runs(rows, self.tensor, offsets, indices, bb, to_arena=to_pool)
            return None
        if self._stream is None:
            self._stream = self._torch.cuda.Stream(device=self.device)
        return cuda.queue_copies(self._stream, self.tensor, rows, offsets, indices, ready,
                                 to_base=to_pool)

    def close(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()
        self.tensor = None
        if self._keep is not None:
            self._keep.close()
            self._keep = None


def open_pool(info) -> PoolView | None:
    """Open the pool an ``HBMPoolInfo`` describes; None (logged) where this process cannot."""
    if not info.backend:
        return None
    try:
        import torch  # noqa: F401
    except ImportError:
        log.debug("not opening the HBM pool: torch is not installed")
        return None
    try:
        if info.backend == "host":
            arena = Arena.attach(info.path, info.uuid, info.size_bytes)
            t = transfer.ArenaView(arena.buffer).torch
            return PoolView(t, "host", keepalive=arena)
        if info.backend == "cuda":
            return PoolView(_open_cuda(info), "cuda")
        log.warning("not opening the HBM pool: unknown backend %r", info.backend)
    except Exception as exc:     # any failure: this client reads through DRAM instead
        log.info("not opening the daemon's HBM pool (%s): gets read through DRAM", exc)
    return None


def _open_cuda(info):
    import torch
    if not torch.cuda.is_available():
        raise RuntimeError("CUDA is not available in this process")
    dev = _device_with_uuid(info.device_uuid)
    if dev is None:
        raise RuntimeError(f"the pool's GPU {info.device_uuid} is not visible to this process")
    storage = torch.UntypedStorage._new_shared_cuda(
        dev, info.ipc_handle, info.ipc_storage_bytes, info.ipc_storage_offset,
        info.ipc_ref_counter_handle, info.ipc_ref_counter_offset,
        info.ipc_event_handle, info.ipc_event_sync_required)
    t = torch.empty(0, dtype=torch.uint8, device=f"cuda:{dev}")
    t.set_(storage, 0, (info.size_bytes,), (1,))
    log.info("opened the HBM pool (%d bytes) on cuda:%d by CUDA IPC", info.size_bytes, dev)
    return t


def _device_with_uuid(uuid: str) -> int | None:
    import torch
    for i in range(torch.cuda.device_count()):
        u = str(getattr(torch.cuda.get_device_properties(i), "uuid", ""))
        if uuid in (u, f"GPU-{u}"):
            return i
    return None
