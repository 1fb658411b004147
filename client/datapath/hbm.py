"""The HBM-pool data path: the daemon's GPU pool opened here (client/hbm.py), over an arena path.

A get into a tensor on the pool's device asks the daemon for HBM (``wants_hbm``). Blocks with
an HBM copy are copied pool -> output device to device; the rest come from the arena through
the inner path, and those the daemon gave a fill slot are then copied output -> pool, so the
next get of them is device to device. HBM slots keep no generations: a block read from the
pool is proven only by a release the daemon confirms; fill slots are published (hbm_filled)
only with proven bytes. Everything else (puts, host tensors, views) is the inner path's.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from kvstore.client.datapath.arena import ArenaPath
from kvstore.client.datapath.base import DataPath, Read
from kvstore.client.hbm import PoolView

if TYPE_CHECKING:
    from kvstore.client.lease import BlockLease

log = logging.getLogger("kvstore.client")


class HBMPath(DataPath):
    shared_memory = True

    def __init__(self, inner: ArenaPath, pool: PoolView):
        self.inner = inner
        self.pool = pool

    @property
    def arena(self):
        return self.inner.arena

    @property
    def generations(self):
        return self.inner.generations

    @property
    def arena_view(self):
        return self.inner.arena_view

    @property
    def pinned(self):
        return self.inner.pinned

    def wants_hbm(self, out) -> bool:
        return out is not None and self.pool.serves(out)

    def write(self, session_id: int, allocation_id: int, offsets: list[int], rows,
              ready=None) -> int:
        return self.inner.write(session_id, allocation_id, offsets, rows, ready)

    def read(self, lease: "BlockLease", dst, ready=None) -> Read:
        reads, fill = lease.hbm_reads, lease.hbm_fills
        if not (reads or fill):
            return self.inner.read(lease, dst, ready)
        found = len(lease)
        from_hbm = [i for i in range(found) if reads[i] >= 0]
        from_dram = [i for i in range(found) if reads[i] < 0]
        done = self.pool.copy(dst, reads, from_hbm, to_pool=False, ready=ready)
        self.inner.copy_out(dst, lease.offsets, from_dram, ready)
        fills = [i for i in from_dram if fill[i] >= 0]
        try:
            fill_done = self.pool.copy(dst, fill, fills, to_pool=True)
            if fill_done is not None:
                fill_done.synchronize()
        except Exception as exc:   # a failed fill costs only the next get's speed
            log.warning("copying %d blocks into the HBM pool failed: %s", len(fills), exc)
            fills = []
        if done is not None:
            done.synchronize()      # before the lease is released
        proof = self.inner.proof(lease, unproven=from_hbm[0] if from_hbm else found)
        return Read(proof.valid, proof.unproven, fills)

    def views(self, offsets: list[int], row_bytes: int, like: str = "torch") -> list:
        return self.inner.views(offsets, row_bytes, like)

    def close(self) -> None:
        self.pool.close()
        self.inner.close()
