"""`kvstore bench prefetch`: a queue of requests whose prefixes live on SSD, served with and
without scheduler hints, in one run.

Setup: a daemon stores ``--requests`` prefixes of ``--blocks`` blocks each (write-through), then
is restarted, so every block is on SSD only (the DRAM tier starts empty). SSD reads are capped
with ``--ssd-read-limit`` so the result does not depend on the page cache or the disk.

Serving: the engine works through the queue; between two gets it is busy for ``--compute-ms``
(the previous request's forward pass, simulated by sleeping: the cache must not need the CPU).
  without hints   each get finds its blocks on SSD and waits for the promotion.
  with hints      at start the engine announces the whole queue (Namespace.prefetch_queue,
                  request i expected at i * compute time); the daemon promotes in that order
                  while the engine computes, so the get finds the blocks in DRAM.
Both runs start from a freshly restarted daemon (all blocks on SSD). Reported: cache wait per
request (time inside get), its ratio with/without, and the daemon's prefetch on-time rate.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from kvstore.bench.harness import emit, private_daemon
from kvstore.core.layout import KVLayout


def _args(argv):
    ap = argparse.ArgumentParser(prog="kvstore bench prefetch", description=__doc__.split("\n")[0],
                                 allow_abbrev=False)
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--blocks", type=int, default=16, help="prefix blocks per request")
    ap.add_argument("--block-kib", type=int, default=256, help="block size (multiple of 32)")
    ap.add_argument("--compute-ms", type=float, default=40.0, help="engine time per request")
    ap.add_argument("--ssd-read-limit", default="200MB/s", help="SSD read cap (testing knob)")
    ap.add_argument("--dir", default=None, help="where the SSD files go (default: a temp dir)")
    ap.add_argument("--json", action="store_true")
    return ap.parse_args(argv)


def _layout(block_kib: int) -> KVLayout:
    # 2 layers x 8 heads x head_dim x 16 tokens x 2 bytes x (k, v) = block_kib KiB
    head_dim = block_kib * 1024 // (2 * 8 * 16 * 2 * 2)
    return KVLayout(num_layers=2, num_kv_heads=8, head_dim=head_dim, block_tokens=16,
                    dtype="float16")


def _serve(sock, layout, prefixes, compute_s, hints: bool) -> dict:
    from kvstore.client import KVClient

    with KVClient(sock, timeout_s=120) as c:
        ns = c.namespace("bench-prefetch", layout)
        ns.lookup(prefixes[0][0][:1])    # session and namespace set up outside the timing
        if hints:
            ns.prefetch_queue([keys for keys, _ in prefixes], interval_s=compute_s)
        waits = []
        for keys, data in prefixes:
            time.sleep(compute_s)                       # the engine's previous forward pass
            t0 = time.perf_counter()
            got = ns.get(keys).result()
            waits.append(time.perf_counter() - t0)
            got = np.asarray(got).view(np.uint8).reshape(data.shape)
            if len(got) != len(keys) or not np.array_equal(got, data):
                raise AssertionError("served blocks differ from what was stored")
        st = c.stats()
        issued = st.prefetch_issued
        return {"wait_mean_s": statistics.fmean(waits), "wait_p50_s": statistics.median(waits),
                "wait_max_s": max(waits), "prefetch_issued": issued,
                "on_time": st.prefetch_on_time, "late": st.prefetch_late,
                "on_time_rate": st.prefetch_on_time / issued if issued else 0.0}


def main(argv=None) -> int:
    a = _args(argv)
    from kvstore.client import KVClient

    layout = _layout(a.block_kib)
    tmp = tempfile.TemporaryDirectory(prefix="kvstore-bench-prefetch-", dir=a.dir)
    ssd = Path(tmp.name)
    total = a.requests * a.blocks * layout.block_bytes
    common = ["--dram-bytes", f"{max(256 << 20, 2 * total)}", "--ssd-dir", str(ssd),
              "--ssd-bytes", f"{max(512 << 20, 2 * total)}"]
    rng = np.random.default_rng(0)
    prefixes = []
    with private_daemon(*common) as sock, KVClient(sock, timeout_s=120) as c:
        ns = c.namespace("bench-prefetch", layout)
        for r in range(a.requests):
            keys = ns.block_keys(rng.integers(0, 50000, a.blocks * layout.block_tokens).tolist())
            data = rng.integers(0, 256, (a.blocks, layout.block_bytes), dtype=np.uint8)
            ns.put(keys, data.view(np.float16).reshape(a.blocks, *layout.block_shape)).result()
            prefixes.append((keys, data))
    runs = {}
    compute_s = a.compute_ms / 1000
    for mode in ("without_hints", "with_hints"):
        with private_daemon(*common, "--ssd-read-limit", a.ssd_read_limit) as sock:
            runs[mode] = _serve(sock, layout, prefixes, compute_s, mode == "with_hints")
    tmp.cleanup()
    w0, w1 = runs["without_hints"]["wait_mean_s"], runs["with_hints"]["wait_mean_s"]
    ratio = w1 / w0 if w0 else 0.0
    result = {"requests": a.requests, "blocks": a.blocks, "block_bytes": layout.block_bytes,
              "compute_s": compute_s, "ssd_read_limit": a.ssd_read_limit, **runs,
              "wait_ratio_with_vs_without": ratio, "goal_met": ratio <= 0.5}
    lines = [
        f"prefetch: {a.requests} requests x {a.blocks} blocks of {layout.block_bytes >> 10} KiB on "
        f"SSD (reads capped at {a.ssd_read_limit}), engine busy {a.compute_ms:g} ms per request",
        f"  cache wait per request without hints: mean {w0 * 1e3:7.2f} ms  p50 "
        f"{runs['without_hints']['wait_p50_s'] * 1e3:7.2f} ms",
        f"  cache wait per request with hints:    mean {w1 * 1e3:7.2f} ms  p50 "
        f"{runs['with_hints']['wait_p50_s'] * 1e3:7.2f} ms",
        f"  with / without: {ratio:.2f}x  (goal <= 0.5x: {'met' if ratio <= 0.5 else 'NOT met'})",
        f"  prefetch on-time rate {runs['with_hints']['on_time_rate']:.0%} "
        f"({runs['with_hints']['on_time']} on time, {runs['with_hints']['late']} late of "
        f"{runs['with_hints']['prefetch_issued']})",
    ]
    emit(result, a.json, lines)
    return 0
