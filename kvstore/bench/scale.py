"""`kvstore bench scale`: how the daemon's lookup and get cost change as the index grows
(10 k → 1 M → 10 M indexed blocks by default), against the same calls at the smallest size in
the same run.

Measured in process, on the daemon's own BlockStore (a real arena, a real index): ``lookup`` of a
batch of keys that are all indexed, and a get's daemon side (``acquire`` + ``release`` of a batch
of DRAM blocks). Only these depend on the index size; a gRPC round trip adds a constant on top
(not measured here). The index is filled with committed blocks whose only copy is on SSD
(addresses only: lookups read the index, never the disk); the get batch is written into DRAM
first. Every lookup must find the whole batch and every acquire must lease it, or the run fails.
Goal (issue 16): p50 flat within 1.5x from the smallest to the largest size.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from kvstore.core.arena import Arena, default_shm_dir
from kvstore.bench.harness import emit
from kvstore.store.table import COMMITTED
from kvstore.core.keys import pack_keys
from kvstore.core.layout import KVLayout
from kvstore.store.blockstore import dram_store

LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=64, block_tokens=16, dtype="float16")
FILL_STEP = 1 << 20


def _random_keys(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 1 << 63, size=(n, 2), dtype=np.uint64)


def _quantiles(samples: list[float]) -> dict:
    a = np.asarray(samples)
    return {"p50_us": float(np.percentile(a, 50) * 1e6), "p99_us": float(np.percentile(a, 99) * 1e6)}


def measure(sizes: list[int], batch: int, rounds: int, directory: Path) -> list[dict]:
    rng = np.random.default_rng(0)
    shm = Path(tempfile.mkdtemp(prefix="kvstore-bench-scale-", dir=directory))
    arena = Arena.create(max(16 << 20, 4 * batch * LAYOUT.slot_bytes), shm)
    rows = []
    try:
        store = dram_store(arena, chunk_bytes=4 << 20, max_batch_blocks=max(4096, batch))
        ns = store.register_namespace("bench-scale", LAYOUT)
        s = store.open_session("bench", os.getpid())
        hot = pack_keys([k.tobytes() for k in _random_keys(rng, batch)])
        aid, offs = store.allocate(s.session_id, ns.namespace_id, hot)
        assert all(o >= 0 for o in offs)
        store.commit(s.session_id, aid)
        idx = store.table
        filled = batch
        for size in sorted(sizes):
            while filled < size:
                n = min(FILL_STEP, size - filled)
                keys = _random_keys(rng, n)
                # as recovered SSD blocks: committed, an SSD address (never read)
                idx.restore_many(ns.index, keys.tobytes(), np.arange(n, dtype=np.int64),
                                 np.zeros(n, np.uint64), np.zeros(n, np.uint32),
                                 np.zeros((n, 2), np.uint64))
                filled += n
            # Batches of keys drawn from the whole index, so probes land all over the table.
            cold = np.flatnonzero((idx.state == COMMITTED) & (idx.dram < 0))
            probes = [idx.keys[rng.choice(cold, batch, replace=False)].tobytes()
                      for _ in range(64)] if len(cold) >= batch else [hot]
            look, get = [], []
            for r in range(-max(10, rounds // 10), rounds):     # untimed warm-up first
                blob = probes[r % len(probes)]
                t0 = time.perf_counter()
                n_found, _ = store.lookup(ns.namespace_id, blob)
                t_lookup = time.perf_counter() - t0
                if n_found != batch:
                    raise RuntimeError(f"lookup found {n_found} of {batch} indexed keys")
                t0 = time.perf_counter()
                lease, offsets, _ = store.acquire(s.session_id, ns.namespace_id, hot)
                store.release(s.session_id, lease.lease_id)
                t_get = time.perf_counter() - t0
                if r >= 0:
                    look.append(t_lookup)
                    get.append(t_get)
                if len(offsets) != batch:
                    raise RuntimeError(f"acquire leased {len(offsets)} of {batch} DRAM blocks")
            rows.append({"indexed_blocks": filled, "index_bytes": idx.nbytes(),
                         "lookup": _quantiles(look), "get": _quantiles(get)})
    finally:
        arena.close()
        shutil.rmtree(shm, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kvstore bench scale", description=__doc__.splitlines()[0],
                                 allow_abbrev=False)
    ap.add_argument("--sizes", default="10000,1000000,10000000",
                    help="indexed blocks, comma-separated (default 10k, 1M, 10M)")
    ap.add_argument("--batch", type=int, default=64, help="keys per lookup / blocks per get")
    ap.add_argument("--rounds", type=int, default=2000, help="calls timed at each size")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    try:
        sizes = sorted(int(float(x)) for x in args.sizes.split(",") if x.strip())
    except ValueError:
        print(f"kvstore bench scale: --sizes {args.sizes!r}: not a list of numbers",
              file=sys.stderr)
        return 2
    if not sizes or sizes[0] < args.batch or args.batch < 1 or args.rounds < 1:
        print("kvstore bench scale: sizes must be at least --batch, batch and rounds positive",
              file=sys.stderr)
        return 2
    rows = measure(sizes, args.batch, args.rounds, default_shm_dir())
    base = rows[0]
    for r in rows:
        for op in ("lookup", "get"):
            r[op]["p50_vs_smallest"] = r[op]["p50_us"] / base[op]["p50_us"]
            r[op]["p99_vs_smallest"] = r[op]["p99_us"] / base[op]["p99_us"]
    result = {"batch": args.batch, "rounds": args.rounds, "sizes": rows,
              "lookup_p50_growth": rows[-1]["lookup"]["p50_vs_smallest"],
              "get_p50_growth": rows[-1]["get"]["p50_vs_smallest"]}
    lines = [f"kvstore bench scale: daemon-side cost of a {args.batch}-key lookup and a "
             f"{args.batch}-block get (acquire+release), {args.rounds} calls per size; goal: "
             "flat within 1.5x",
             f"{'indexed':>12} {'index MiB':>10} {'lookup p50/p99 us':>19} {'vs first':>9} "
             f"{'get p50/p99 us':>16} {'vs first':>9}"]
    for r in rows:
        lk, gt = r["lookup"], r["get"]
        lines.append(f"{r['indexed_blocks']:>12,} {r['index_bytes'] / 2**20:>10.1f} "
                     f"{lk['p50_us']:>9.1f}/{lk['p99_us']:<9.1f} {lk['p50_vs_smallest']:>8.2f}x "
                     f"{gt['p50_us']:>7.1f}/{gt['p99_us']:<8.1f} {gt['p50_vs_smallest']:>8.2f}x")
    emit(result, args.json, lines)
    return 0
