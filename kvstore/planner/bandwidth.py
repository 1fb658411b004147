"""Per-tier read bandwidth, as the recompute planner needs it (bytes/s of one request's load).

- DRAM: a client copies blocks out of the shared arena, so the figure is memcpy-scale: measured
  once at startup (best of a few 64 MiB copies on this host).
- SSD: the throughput recent promotions achieved (kvstore.tiers.ssd.tier.SSDTier.read_bps:
  bytes / wall time of each batch of parallel reads, capped by ``ssd_read_limit``). A daemon
  that has read nothing yet measures it on demand (SSDTier.measure_read_bps: a few of the
  request's own SSD blocks read into a scratch buffer, pinned meanwhile, bytes discarded): a
  cold daemon must not guess.
"""
from __future__ import annotations

import time

import numpy as np


def measure_memcpy_bps(nbytes: int = 64 << 20, repeats: int = 3) -> float:
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best if best > 0 else 0.0
