"""Per-tier read bandwidth, as the recompute planner needs it (bytes/s of one request's load).

- DRAM: a client copies blocks out of the shared arena, so the figure is memcpy-scale: measured
  once at startup (best of a few 64 MiB copies on this host).
- SSD: the throughput recent promotions achieved (Tiering.read_bps: bytes / wall time of each
  batch of parallel reads, capped by ``ssd_read_limit``). A daemon that has read nothing yet
  measures it on demand by reading a few of the request's own SSD blocks into a scratch buffer
  (pinned meanwhile, bytes discarded): a cold daemon must not guess.
"""
from __future__ import annotations

import asyncio
import time

import numpy as np

from kvstore.store.index import COMMITTED, NO_SLOT

PROBE_BLOCKS = 4


def measure_memcpy_bps(nbytes: int = 64 << 20, repeats: int = 3) -> float:
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best if best > 0 else 0.0


async def probe_ssd_bps(tiering, block_ids: list[int]) -> float:
    """Read up to PROBE_BLOCKS of these SSD blocks in parallel, return bytes/s (0 if none)."""
    store, idx, ssd = tiering.store, tiering.store.index, tiering.ssd
    bids = [b for b in block_ids
            if idx.ssd[b] != NO_SLOT and idx.state[b] == COMMITTED][:PROBE_BLOCKS]
    if not bids:
        return 0.0
    store.pin(bids)
    try:
        reads = []
        for b in bids:
            layout = store._ns_by_index[int(idx.ns[b])].layout
            buf = memoryview(bytearray(layout.slot_bytes))
            reads.append((int(idx.ssd[b]), buf, idx.key_of(b), layout.block_bytes,
                          int(idx.csum[b])))
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        await asyncio.gather(*(loop.run_in_executor(ssd.pool, ssd.read_slots, [r])
                               for r in reads))
        tiering._observe_read(sum(len(r[1]) for r in reads), time.monotonic() - t0)
    finally:
        store.unpin(bids)
    return tiering.read_bps()
