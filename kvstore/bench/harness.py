"""Shared pieces of the benchmarks: a private daemon process (kvstore.testing.daemon), timing,
and output."""
from __future__ import annotations

import contextlib
import json
import time

from kvstore.testing.daemon import DaemonProcess


@contextlib.contextmanager
def private_daemon_process(*args: str, startup_timeout_s: float = 60.0):
    """Run `kvstore serve` on a private socket and shm dir (``args`` may override its 512 MiB
    DRAM tier in 64 MiB chunks); yields the DaemonProcess (``.socket``, ``.proc.pid``),
    closes the daemon after."""
    d = DaemonProcess.private(extra_args=args).start(startup_timeout_s)
    try:
        yield d
    finally:
        d.close()


@contextlib.contextmanager
def private_daemon(*args: str, startup_timeout_s: float = 60.0):
    """As private_daemon_process; yields the socket path."""
    with private_daemon_process(*args, startup_timeout_s=startup_timeout_s) as d:
        yield d.socket


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
