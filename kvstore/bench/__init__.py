"""`kvstore bench NAME [args]`: benchmarks that print ratios against a baseline of the same run.

BENCHMARKS maps a name to the module that implements it; each module has ``main(argv) -> int``.
"""
from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "vllm": "kvstore.bench.vllm",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHMARKS:
        names = ", ".join(sorted(BENCHMARKS))
        msg = f"usage: kvstore bench {{{names}}} [--help | options]"
        if argv and argv[0] not in ("-h", "--help"):
            print(f"kvstore bench: unknown benchmark {argv[0]!r}\n{msg}", file=sys.stderr)
            return 2
        print(msg)
        return 0
    return importlib.import_module(BENCHMARKS[argv[0]]).main(argv[1:])
