"""A late write never lands in another block: the slots of a put that ended without a commit
(its session closed, its client gone) are quarantined until the writer's process can no longer
write them — it exited or unmapped the arena (kvstore/store/writers.py). Real daemon, real
writer process (paused between its allocation and its copy), real reader; bytes compared."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from kvstore.client import KVClient
from kvstore.client.errors import Unavailable
from support.ssd import LAYOUT, chain, get_exact, put_chain

TESTS = Path(__file__).resolve().parent.parent
DRAM = ("--dram-bytes", "4MiB", "--chunk-bytes", "1MiB")
N_LATE = 8

# The writer: allocates N_LATE slots and keeps their views, closes its client (its session
# ends with the allocation open), then waits — a copy paused mid-way — until told to write;
# then writes 0xAB over every slot it had, and waits until told to end (unmap, then exit).
WRITER = textwrap.dedent(f"""
    import gc, sys
    sys.path.insert(0, {str(TESTS)!r})
    import numpy as np
    from kvstore.client import KVClient
    from support.ssd import LAYOUT, chain
    c = KVClient(sys.argv[1])
    ns = c.namespace("late", LAYOUT)
    tokens, _ = chain(999, {N_LATE})
    alloc = ns.allocate(ns.block_keys(tokens))
    views = alloc.views(like="numpy")
    assert all(v is not None for v in views) and len(views) == {N_LATE}
    c.close()
    print("closed", flush=True)
    for line in sys.stdin:
        if line.strip() == "write":
            for i in range(len(views)):
                views[i][:] = 0xAB
            print("written", flush=True)
        elif line.strip() == "unmap":
            del views, alloc, ns, c
            gc.collect()
            print("unmapped", flush=True)
        elif line.strip() == "exit":
            break
""")


def _stats(sock: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "kvstore", "stats", "--socket", sock, "--json"],
                       capture_output=True, text=True, timeout=60, check=True)
    return json.loads(r.stdout)


def _wait(pred, timeout_s: float = 15.0):
    deadline = time.monotonic() + timeout_s
    while True:
        v = pred()
        if v:
            return v
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


@pytest.fixture
def writer(daemon_factory):
    d = daemon_factory(*DRAM)
    p = subprocess.Popen([sys.executable, "-c", WRITER, d.socket], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)

    def say(cmd: str, expect: str) -> None:
        p.stdin.write(cmd + "\n")
        p.stdin.flush()
        assert p.stdout.readline().strip() == expect

    try:
        assert p.stdout.readline().strip() == "closed"
        yield d, p, say
    finally:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=30)


def _fill(ns, capacity: int) -> list[tuple[list[bytes], np.ndarray]]:
    """Put chains of 8 blocks into every slot the store can still give (quarantined slots
    excluded): nothing this client put is evicted, so every block must read back."""
    out = []
    for seed in range(capacity // 8):
        out.append(put_chain(ns, 100 + seed, 8))
    return out


def test_a_late_write_after_the_session_closed_never_corrupts_a_committed_block(writer):
    d, p, say = writer
    with KVClient(d.socket) as c:
        ns = c.namespace("late", LAYOUT)
        dram = c.stats().tier("DRAM")
        slot = LAYOUT.slot_bytes
        free_slots = (dram.capacity_bytes - dram.used_bytes) // slot - N_LATE
        chains = _fill(ns, free_slots)
        assert c.stats().tier("DRAM").evictions == 0
        say("write", "written")                    # the paused copy lands now
        for keys, data in chains:
            assert get_exact(ns, keys, data) == len(keys)
        assert c.stats().quarantined_bytes == N_LATE * slot     # held: the writer lives
        say("unmap", "unmapped")                   # the process lives on, the arena unmapped
        _wait(lambda: c.stats().quarantined_bytes == 0)
        assert _stats(d.socket)["quarantined_bytes"] == 0
        # the slots are usable again: a put that needs them evicts nothing
        keys, data = put_chain(ns, 7, N_LATE)
        assert get_exact(ns, keys, data) == N_LATE
        assert c.stats().tier("DRAM").evictions == 0


def test_the_quarantine_ends_when_the_writer_exits(writer):
    d, p, say = writer
    slot = LAYOUT.slot_bytes
    assert _stats(d.socket)["quarantined_bytes"] == N_LATE * slot
    p.kill()           # views still mapped: only its death proves it cannot write
    p.wait(timeout=30)
    _wait(lambda: _stats(d.socket)["quarantined_bytes"] == 0)


def test_close_joins_its_own_copies_before_the_session_ends(daemon_factory):
    """close() returns only after the put running on the SDK's thread finished: its session
    ended after its copy, so the daemon has nothing to quarantine and the put is committed."""
    d = daemon_factory(*DRAM)
    c = KVClient(d.socket)
    ns = c.namespace("join", LAYOUT)
    tokens, data = chain(5, 64)
    keys = ns.block_keys(tokens)
    futs = [ns.put(keys[i:i + 8], data[i:i + 8]) for i in range(0, 64, 8)]
    c.close(timeout_s=0.0)        # no wait for the puts' futures: only the join
    assert all(f.done() for f in futs)
    # what had not started when close() began joining failed as a closed client's call does
    refused = [f for f in futs if f.exception() is not None]
    assert all(isinstance(f.exception(), Unavailable) for f in refused)
    st = _stats(d.socket)
    assert st["quarantined_bytes"] == 0
    done = sum(f.result() for f in futs if f.exception() is None)
    assert st["tiers"][0]["blocks"] == done
    with KVClient(d.socket) as r:
        rns = r.namespace("join", LAYOUT)
        for i, f in enumerate(futs):
            if f.exception() is None:
                assert get_exact(rns, keys[8 * i:8 * i + 8], data[8 * i:8 * i + 8]) == 8


# A writer putting 16 blocks of 512 KiB (all 7.0) at a time through the SDK, in a loop; one
# line per put that ended ("ok" or the error's class).
PUTTER = textwrap.dedent(f"""
    import sys
    sys.path.insert(0, {str(TESTS)!r})
    import numpy as np
    from kvstore.client import KVClient
    from support.readerproc import LAYOUT
    c = KVClient(sys.argv[1], copy_threads=1, timeout_s=5)
    ns = c.namespace("putter", LAYOUT)
    data = np.full((16, *LAYOUT.block_shape), 7.0, dtype=np.float32)
    print("ready", flush=True)
    i = 0
    while True:
        i += 1
        keys = ns.block_keys([i] + list(range(16 * 16 - 1)))
        try:
            ns.put(keys, data).result()
            print("ok", flush=True)
        except Exception as exc:
            print(type(exc).__name__, flush=True)
""")


def test_a_writer_stopped_mid_copy_while_its_session_ends_corrupts_nothing(daemon_factory,
                                                                          tmp_path):
    """Rounds of: the putter SIGSTOPped (mid-copy when its session ends with an allocation
    open: sessions_reclaimed says so) → its connection cut, the daemon ends its session →
    another client fills the store → the putter resumes its copy. Every block the other
    client reads back is exactly its own."""
    import queue
    import random
    import signal
    import threading

    from support.net import UnixProxy
    from support.readerproc import LAYOUT as BIG
    from support.readerproc import block_for
    from support.readers import churn

    d = daemon_factory("--dram-bytes", "36MiB", "--chunk-bytes", "4MiB",   # 64 big slots
                       "--max-inflight-bytes-per-client", "256MiB")
    proxy = UnixProxy(str(tmp_path / "proxy.sock"), d.socket)
    caught = 0
    try:
        with KVClient(d.socket) as c:
            deadline = time.monotonic() + 150
            round_no = 0
            while caught < 2 and round_no < 12 and time.monotonic() < deadline:
                round_no += 1
                p = subprocess.Popen([sys.executable, "-c", PUTTER, proxy.path],
                                     stdout=subprocess.PIPE, text=True)
                lines: queue.Queue = queue.Queue()
                threading.Thread(target=lambda: [lines.put(x.strip()) for x in p.stdout],
                                 daemon=True).start()
                try:
                    assert lines.get(timeout=60) == "ready"
                    lines.get(timeout=60)                        # one put done: in its loop
                    reclaimed = c.stats().sessions_reclaimed
                    time.sleep(random.uniform(0.0, 0.02))
                    p.send_signal(signal.SIGSTOP)
                    proxy.cut()               # the daemon ends the putter's session
                    _wait(lambda: c.stats().sessions == 1)
                    if c.stats().sessions_reclaimed == reclaimed:
                        continue              # stopped between puts: nothing open, next round
                    caught += 1
                    keys = churn(c, round_no)          # 60 big blocks of other bytes
                    while not lines.empty():
                        lines.get_nowait()
                    p.send_signal(signal.SIGCONT)      # the stopped copy goes on
                    lines.get(timeout=60)              # ... and its put ended
                    p.kill()
                    p.wait(timeout=30)
                    ns = c.namespace("reads", BIG)
                    out = np.empty((len(keys), *BIG.block_shape), dtype=np.float32)
                    got = ns.get(keys, out=out).result(timeout=60)
                    assert len(got) > 0
                    for i in range(len(got)):
                        assert np.array_equal(got[i], block_for(keys[i], 1)), \
                            f"round {round_no}: block {i} holds other bytes"
                    _wait(lambda: c.stats().quarantined_bytes == 0)   # the writer is gone
                    ns.delete(keys)
                finally:
                    if p.poll() is None:
                        p.send_signal(signal.SIGCONT)
                        p.kill()
                        p.wait(timeout=30)
        assert caught, "no round stopped the putter mid-copy"
    finally:
        proxy.close()
