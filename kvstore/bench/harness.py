"""Shared pieces of the benchmarks: a private daemon process, timing, and output."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


@contextlib.contextmanager
def private_daemon(*args: str, startup_timeout_s: float = 60.0):
    """Run `kvstore serve` on a private socket and shm dir; yields the socket path."""
    from kvstore.client import KVClient, KVStoreError

    workdir = Path(tempfile.mkdtemp(prefix="kvstore-bench-"))
    shm = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else workdir
    shm_dir = Path(tempfile.mkdtemp(prefix="kvstore-bench-", dir=shm))
    sock = str(workdir / "kv.sock")
    log = open(workdir / "daemon.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "kvstore", "serve", "--socket", sock,
                             "--shm-dir", str(shm_dir), *args],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"daemon exited: {(workdir / 'daemon.log').read_text()}")
            if os.path.exists(sock):
                try:
                    KVClient(sock, timeout_s=2).close()
                    break
                except KVStoreError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError("daemon did not start")
            time.sleep(0.05)
        yield sock
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(shm_dir, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)


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
