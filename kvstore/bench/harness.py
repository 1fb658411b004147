"""Shared pieces of the benchmarks: a private daemon process, timing, and output."""
from __future__ import annotations

import contextlib
import json
import time

from kvstore.testing.daemon import PrivateDaemon


@contextlib.contextmanager
def private_daemon(*args: str, startup_timeout_s: float = 60.0):
    """Run `kvstore serve` on a private socket and shm dir; yields the socket path."""
    d = PrivateDaemon(extra_args=list(args)).start(startup_timeout_s)
    try:
        yield d.socket
    finally:
        d.stop()


def best_of(fn, repeats: int) -> float:
    """Shortest wall time of ``repeats`` calls (the least disturbed by other load)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def emit(result: dict, as_json: bool, lines: list[str]) -> None:
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print("\n".join(lines))
