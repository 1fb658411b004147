"""`kvstore bench NAME [options]` (or `python -m kvstore.bench NAME`): benchmarks.

Each prints its figures next to a baseline measured in the same run and the ratio between them;
machines are shared and noisy, so only same-run ratios mean anything. `--json` for scripts.
Each module in BENCHMARKS exposes ``main(argv) -> exit code`` and is imported only when run,
so one benchmark's heavy dependencies never burden another.
"""
from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import re
import sys
import textwrap
from pathlib import Path

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


def summary(name: str) -> str:
    """What a benchmark measures, in words: the first sentence of its module's docstring, read
    from the source (importing would pull in its heavy dependencies just to print help)."""
    spec = importlib.util.find_spec(BENCHMARKS[name])
    try:
        doc = ast.get_docstring(ast.parse(Path(spec.origin).read_text())) or ""
    except (OSError, SyntaxError, AttributeError, TypeError):
        doc = ""
    first = " ".join(doc.split("\n\n")[0].split())
    # The docstrings open with their own command line: "`kvstore bench ssd`: ..." (or "—").
    first = re.sub(r"^`?`?(python -m )?kvstore[ .]bench[ .]\w+`?`?\s*[:—-]\s*", "", first)
    return first if first.startswith("kvstore") else first[:1].upper() + first[1:]


def usage() -> str:
    width = max(len(n) for n in BENCHMARKS)
    lines = ["usage: kvstore bench NAME [options]   (kvstore bench NAME --help for its options)",
             "", "Each benchmark prints its figures beside a baseline measured in the same run.",
             "", "benchmarks:"]
    for name in BENCHMARKS:
        text = textwrap.wrap(summary(name), 96 - width - 4) or [""]
        lines.append(f"  {name:<{width}}  {text[0]}")
        lines += [" " * (width + 4) + t for t in text[1:]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run one benchmark: its exit code; 2 (with the list) for no or an unknown name."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())             # no name: the same list, exit 2
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        near = difflib.get_close_matches(name, list(BENCHMARKS), n=1, cutoff=0.6)
        hint = f"did you mean {near[0]}?" if near else f"known: {', '.join(BENCHMARKS)}"
        print(f"kvstore bench: unknown benchmark {name!r} ({hint})", file=sys.stderr)
        return 2
    return importlib.import_module(BENCHMARKS[name]).main(rest)
