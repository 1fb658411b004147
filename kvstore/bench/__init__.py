"""`kvstore bench NAME [args]`: the benchmarks, each a module with ``main(argv) -> int``.

BENCHMARKS maps a name to its module's dotted path; modules are imported only when run, so a
daemon-only install (no torch) still lists them. Add a benchmark with one line here.
"""
from __future__ import annotations

import importlib
import sys

BENCHMARKS: dict[str, str] = {
    "ttft": "kvstore.bench.ttft",
}


def _summary(name: str) -> str:
    try:
        doc = importlib.import_module(BENCHMARKS[name]).__doc__ or ""
    except ImportError as exc:
        return f"(unavailable: {exc})"
    first = doc.strip().splitlines()[0] if doc.strip() else ""
    return first.split(" — ", 1)[-1]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: kvstore bench NAME [options]   (kvstore bench NAME --help)\n\nbenchmarks:")
        for name in sorted(BENCHMARKS):
            print(f"  {name:<12} {_summary(name)}")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        print(f"kvstore bench: unknown benchmark {name!r}; one of {', '.join(sorted(BENCHMARKS))}",
              file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(BENCHMARKS[name])
    except ImportError as exc:
        print(f"kvstore bench {name}: missing dependency ({exc}); "
              "install the extras: pip install 'kvstore[hf]'", file=sys.stderr)
        return 1
    return module.main(rest)
