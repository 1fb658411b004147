"""`kvstore bench <name>`: benchmarks that print ratios against baselines measured in the same run.

Each benchmark is a module of this package with ``main(argv) -> int``; ``BENCHES`` maps the
subcommand name to its module (imported only when run, so one bench's heavy imports never slow
another). Register a new benchmark with one line here.
"""
from __future__ import annotations

import importlib
import sys

BENCHES: dict[str, str] = {
    "ssd": "kvstore.bench.ssd",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: kvstore bench {%s} [options]  (kvstore bench NAME --help)"
              % ",".join(sorted(BENCHES)))
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in BENCHES:
        print(f"kvstore bench: unknown benchmark {name!r} (known: {', '.join(sorted(BENCHES))})",
              file=sys.stderr)
        return 2
    return importlib.import_module(BENCHES[name]).main(rest)
