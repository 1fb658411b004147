"""`kvstore bench NAME [options]` (or `python -m kvstore.bench NAME`): benchmarks.

Each prints its figures next to a baseline measured in the same run and the ratio between them;
machines are shared and noisy, so only same-run ratios mean anything. `--json` for scripts.
Each module in BENCHMARKS exposes ``main(argv) -> exit code`` and is imported only when run,
so one benchmark's heavy dependencies never burden another.
"""
from __future__ import annotations

import importlib
import sys

BENCHMARKS: dict[str, str] = {
    "dram": "kvstore.bench.dram",        # SDK put/get through the shared arena vs memcpy
    "gpu": "kvstore.bench.gpu",          # SDK H2D/D2H vs pinned cudaMemcpy; kernels vs memcpy
    "kernels": "kvstore.bench.kernels",  # reference gather/scatter vs a plain copy (CPU or GPU)
    "ssd": "kvstore.bench.ssd",          # SDK get/put through the SSD tier vs raw O_DIRECT
    "prefetch": "kvstore.bench.prefetch",  # cache wait with scheduler hints vs without
    "recompute": "kvstore.bench.recompute",  # TTFT: load-all, recompute-all, planned hybrid
    "ttft": "kvstore.bench.ttft",        # HF TTFT: full prefill vs reuse from DRAM / SSD
    "vllm": "kvstore.bench.vllm",        # vLLM TTFT with and without the kvstore connector
    "sglang": "kvstore.bench.sglang",    # SGLang HiCache backup/prefetch: kvstore vs its file backend
    "peers": "kvstore.bench.peers",      # kvstore vs file-per-block and Redis block stores
    "startup": "kvstore.bench.startup",  # time to serve and to full capacity vs fallocate
    "scale": "kvstore.bench.scale",      # lookup/get cost at 10k, 1M, 10M indexed blocks
    "cluster": "kvstore.bench.cluster",  # cluster tier: host B reads host A's blocks vs raw client
    "control": "kvstore.bench.control",  # same-host lookups: shared-memory index vs gRPC
    "trace": "kvstore.bench.trace",      # a production trace replayed: hit ratio vs ideal caches
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: kvstore bench NAME [options]   (kvstore bench NAME --help)\n\nbenchmarks:")
        for name, mod in BENCHMARKS.items():
            print(f"  {name:<10} {mod}")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        print(f"kvstore bench: unknown benchmark {name!r} (known: {', '.join(BENCHMARKS)})",
              file=sys.stderr)
        return 2
    return importlib.import_module(BENCHMARKS[name]).main(rest)
