"""The read contract's accounting: lease-free reads and lookups answered from the index snapshot
made no RPC on their path, yet the daemon's counters show them as if they had been Acquires and
Lookup calls — also when their blocks were deleted before the report arrived."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np

from kvstore.client import KVClient
from kvstore.core.arena import Arena
from kvstore.core.layout import KVLayout
from kvstore.core.slotgen import SlotGenerations
from kvstore.core import shmindex
from kvstore.store.blockstore import dram_store
from support.ssd import LAYOUT, SMALL_DRAM, put_chain


def test_a_report_arriving_after_the_delete_still_counts(tmp_path):
    arena = Arena.create(16 << 20, tmp_path)
    gens = SlotGenerations.create(arena.path, arena.uuid, arena.size_bytes)
    snap = shmindex.ShmIndex.create(arena.path, arena.uuid, buckets=1024)
    try:
        store = dram_store(arena, chunk_bytes=1 << 20, generations=gens, snapshot=snap)
        s = store.open_session()
        layout = KVLayout(2, 4, 64, block_tokens=16, dtype="uint8")
        ns = store.register_namespace("gone", layout)
        keys = [bytes([i]) * 16 for i in range(1, 5)]
        blob = b"".join(keys)
        aid, _ = store.allocate(s.session_id, ns.namespace_id, blob)
        assert store.commit(s.session_id, aid) == 4
        # a client read all four lease-free; three are deleted before its report lands
        assert store.delete(ns.namespace_id, b"".join(keys[1:])) == 3
        bids = store.report_reads(ns.namespace_id, blob + b"\x77" * 16, misses=1, lookups=7)
        assert len(bids) == 1                       # only the stored block gets the hooks
        c = store.dram.counters
        assert (c.hits, c.misses, c.bytes_out) == (4, 1, 4 * layout.block_bytes)
        assert store.counters.reads_reported == 5 and store.counters.lookups == 7
    finally:
        snap.close()
        gens.close()
        arena.close()


def test_a_get_then_a_delete_counts_every_block_read(daemon_factory):
    """The delete waits for this client's queued read reports: the DRAM hits it shows are the
    blocks the get read, every time."""
    d = daemon_factory(*SMALL_DRAM)
    with KVClient(d.socket) as c:
        ns = c.namespace("acct", LAYOUT)
        for rnd in range(5):
            keys, data = put_chain(ns, rnd, 8)
            before = c.stats().tier("DRAM").hits
            got = ns.get(keys).result(timeout=30)
            assert np.array_equal(np.asarray(got), data)
            assert ns.delete(keys) == 8
            # another process's view: no flush of this client's reports on its path
            st = json.loads(subprocess.run(
                [sys.executable, "-m", "kvstore", "stats", "--socket", d.socket, "--json"],
                capture_output=True, text=True, timeout=60, check=True).stdout)
            assert st["tiers"][0]["hits"] - before == 8, f"round {rnd}"
        assert ns.local_gets_answered == 5


def test_snapshot_lookups_show_in_stats(daemon_factory):
    """A client process answers 500 lookups from the index snapshot (no RPC); the operator's
    `kvstore stats` counts every one of them, plus the lookups that went over gRPC."""
    d = daemon_factory(*SMALL_DRAM)
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(__import__("pathlib").Path(__file__).parent.parent)!r})
        from kvstore.client import KVClient
        from support.ssd import LAYOUT, put_chain
        with KVClient({d.socket!r}) as c:
            ns = c.namespace("lk", LAYOUT)
            keys, _ = put_chain(ns, 3, 4)
            for _ in range(500):
                assert ns.lookup(keys).num_cached == 4
            ns.local_lookups = False
            for _ in range(3):
                assert ns.lookup(keys).num_cached == 4
            print(ns.local_lookups_answered)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.split()[-1]) == 500
    st = json.loads(subprocess.run(
        [sys.executable, "-m", "kvstore", "stats", "--socket", d.socket, "--json"],
        capture_output=True, text=True, timeout=60, check=True).stdout)
    assert st["lookups"] == 503
    with KVClient(d.socket) as c:      # and through the SDK, this client's own lookups too
        ns = c.namespace("lk", LAYOUT)
        keys = ns.block_keys(list(range(64)))
        for _ in range(10):
            ns.lookup(keys)
        assert ns.local_lookups_answered == 10
        assert c.stats().lookups == 513
