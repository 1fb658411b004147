"""The pinned-DMA data path: the mapped arena registered as pinned memory (client/cuda.py).

A CUDA tensor moves by one DMA per run of adjacent slots on a side stream, after the caller's
stream as of put()/get() (``ready``); host tensors are copied as on ArenaPath. Each copy is
waited for before write/read return: a put commits whole blocks, and a get's lease is released
only after the DMA that reads its slots has finished.
"""
from __future__ import annotations

from kvstore.client import cuda
from kvstore.client.datapath.arena import ArenaMapping, ArenaPath


class PinnedPath(ArenaPath):
    def __init__(self, mapping: ArenaMapping, pinned: cuda.PinnedArena, copy_pool=None):
        super().__init__(mapping, copy_pool)
        self.pinned = pinned

    def copy_in(self, rows, offsets: list[int], indices: list[int], ready=None) -> None:
        if not cuda.is_cuda_tensor(rows):
            return super().copy_in(rows, offsets, indices, ready)
        self.pinned.to_arena(rows, offsets, indices, ready).synchronize()

    def copy_out(self, dst, offsets: list[int], indices: list[int], ready=None) -> None:
        if not indices:
            return
        if not cuda.is_cuda_tensor(dst):
            return super().copy_out(dst, offsets, indices, ready)
        self.pinned.from_arena(dst, offsets, ready, indices).synchronize()

    def close(self) -> None:
        self.pinned.close()          # unregister before the mapping goes
        super().close()
