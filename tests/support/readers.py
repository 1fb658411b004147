"""Driving tests/support/readerproc.py from a test: start it, read its lines, churn its slots."""
from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading

import numpy as np

from support import SUPPORT
from support.readerproc import LAYOUT, block_for


def start_reader(sock: str, n: int, shm: bool = True, lease_free: bool = False):
    """A reader process getting its ``n`` blocks in a loop (see readerproc.py); returns
    (process, queue of its output lines) once it printed "ready"."""
    p = subprocess.Popen([sys.executable, str(SUPPORT / "readerproc.py"), sock, str(n),
                          "1" if shm else "0", "1" if lease_free else "0"],
                         stdout=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in p.stdout], daemon=True).start()
    assert lines.get(timeout=60).strip() == "ready"
    return p, lines


def drain(lines: queue.Queue) -> list[dict]:
    """The reader's get reports printed so far."""
    out = []
    while True:
        try:
            out.append(json.loads(lines.get_nowait()))
        except queue.Empty:
            return out


def churn(c, round_no: int) -> list[bytes]:
    """Put other bytes (tag 1) into (nearly) every slot of a 36 MiB DRAM tier: the reader's
    blocks are evicted and their slots written over."""
    ns = c.namespace("reads", LAYOUT)
    keys = ns.block_keys([round_no] + list(range(100_000, 100_000 + 16 * 64 - 1)))[:60]
    ns.put(keys, np.stack([block_for(k, 1) for k in keys])).result(timeout=60)
    return keys
