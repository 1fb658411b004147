"""Benchmarks: `kvstore bench NAME [options]` (or `python -m kvstore.bench NAME`).

Each prints its figures next to a baseline measured in the same run and the ratio between them;
machines are shared and noisy, so only same-run ratios mean anything. `--json` for scripts.
"""
from __future__ import annotations

import importlib
import sys

# name -> module (relative to kvstore.bench) exposing main(argv) -> int
BENCHMARKS = {
    "ttft": "ttft",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: kvstore bench {" + ",".join(BENCHMARKS) + "} [options]")
        print(__doc__.strip().splitlines()[2] if __doc__ else "")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        print(f"kvstore bench: unknown benchmark {name!r} (choose from {', '.join(BENCHMARKS)})",
              file=sys.stderr)
        return 2
    module = importlib.import_module(f"kvstore.bench.{BENCHMARKS[name]}")
    return module.main(rest)
