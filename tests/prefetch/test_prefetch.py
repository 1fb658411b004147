"""Prefetch through real daemon processes: SSD blocks promoted ahead of the get, shared
transfers for late gets, outcome counts, and every prefetch's state reclaimed."""
from __future__ import annotations

import time

import numpy as np
import pytest

from kvstore.client import KVClient
from kvstore.client.errors import InvalidArgument, NotFound

from support.ssd import BB, LAYOUT, get_exact, on_ssd, put_chain, ssd_stats, tier


def _wait(pred, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_prefetch_promotes_then_get_is_on_time(daemon_factory, tmp_path):
    d, [(keys, data)] = on_ssd(daemon_factory, tmp_path)
    with KVClient(d.socket) as c:
        ns = c.namespace("m", LAYOUT)
        assert ns.lookup(keys).tiers == ["SSD"] * 16
        t = ns.prefetch(keys, deadline_s=5.0)
        assert (t.blocks, t.to_promote) == (16, 16) and t.prefetch_id
        _wait(lambda: ns.lookup(keys).tiers == ["DRAM"] * 16)
        assert get_exact(ns, keys, data) == 16
        st = c.stats()
        assert (st.prefetch_issued, st.prefetch_on_time, st.prefetch_late) == (1, 1, 0)
        assert st.prefetch_bytes_promoted == 16 * BB and st.prefetch_pending == 0


def test_late_get_shares_the_transfer_in_flight(daemon_factory, tmp_path):
    # 16 blocks of 16 KiB at 1 MB/s: the transfer takes ~0.25 s, the get arrives at once.
    d, [(keys, data)] = on_ssd(daemon_factory, tmp_path, extra=("--ssd-read-limit", "1MB/s"))
    with KVClient(d.socket) as c:
        ns = c.namespace("m", LAYOUT)
        ns.prefetch(keys, deadline_s=5.0)
        t0 = time.monotonic()
        assert get_exact(ns, keys, data) == 16
        assert time.monotonic() - t0 > 0.1            # it waited for the capped transfer
        st = c.stats()
        assert (st.prefetch_on_time, st.prefetch_late) == (0, 1)
        assert tier(ssd_stats(c), "SSD").bytes_out == 16 * BB   # one read per block, not two


def test_ten_thousand_prefetches_all_end_and_nothing_stays_pinned(daemon_factory, tmp_path):
    # 200 distinct blocks pinned at once (of 256 in DRAM): above the default per-client share
    d, chains = on_ssd(daemon_factory, tmp_path, n_chains=4, n_blocks=50,
                        extra=("--max-prefetch-bytes-per-client", "4MiB"))
    with KVClient(d.socket) as c:
        ns = c.namespace("m", LAYOUT)
        keys = [k for ks, _ in chains for k in ks]
        # Every prefix of every chain, over and over: 10,000 prefetches, 0.3 s leases.
        items = [(chains[i % 4][0][:1 + i % 50], 0.0) for i in range(10_000)]
        tickets = []
        for i in range(0, len(items), 2500):
            tickets += ns.prefetch_many(items[i:i + 2500], grace_s=0.3)
        assert all(t.prefetch_id for t in tickets)
        got = get_exact(ns, chains[0][0], chains[0][1])    # reads 1 in 4 of them at most
        assert got == 50
        _wait(lambda: c.stats().prefetch_pending == 0, timeout_s=15)
        st = c.stats()
        assert st.prefetch_issued == 10_000
        assert st.prefetch_on_time + st.prefetch_late + st.prefetch_wasted + \
            st.prefetch_cancelled == 10_000
        assert st.prefetch_wasted >= 7_000
        # Nothing stays pinned: a working set the size of the whole DRAM tier evicts them all.
        ns2 = c.namespace("m2", LAYOUT)
        for seed in range(100, 104):
            put_chain(ns2, seed, 64)
        assert ns.lookup(keys[:1]).tiers in ([], ["SSD"])   # demoted or evicted, not pinned


def test_cancel_and_session_end_end_prefetches(daemon_factory, tmp_path):
    d, [(keys, _)] = on_ssd(daemon_factory, tmp_path)
    with KVClient(d.socket) as c:
        ns = c.namespace("m", LAYOUT)
        t = ns.prefetch(keys, deadline_s=60)
        assert ns.cancel_prefetch([t]) == 1 and ns.cancel_prefetch([t]) == 0
        ns.prefetch(keys, deadline_s=60)
        assert c.stats().prefetch_pending == 1
    with KVClient(d.socket) as c2:
        _wait(lambda: c2.stats().prefetch_pending == 0)   # the first session ended
        assert c2.stats().prefetch_cancelled == 2


def test_prefetch_bad_input_is_a_clear_error(daemon_factory, tmp_path):
    d, [(keys, _)] = on_ssd(daemon_factory, tmp_path)
    with KVClient(d.socket) as c:
        ns = c.namespace("m", LAYOUT)
        with pytest.raises(InvalidArgument, match="deadline_s"):
            ns.prefetch(keys, deadline_s=-1)
        with pytest.raises(InvalidArgument):
            ns.prefetch_many([(keys, 1.0)], grace_s=float("nan"))
        assert ns.prefetch([b"\x01" * 16]).prefetch_id == 0     # nothing cached: nothing to do
        from kvstore.v1 import kvstore_pb2 as pb
        with pytest.raises(NotFound, match="unknown namespace"):
            c.call("Prefetch", pb.PrefetchRequest(
                session_id=c.session_id, namespace_id=b"\x07" * 16,
                items=[pb.PrefetchItem(keys=b"".join(keys), deadline_s=1.0)]))
        assert c.stats().prefetch_pending == 0


def test_one_client_cannot_pin_more_than_its_prefetch_share(daemon_factory, tmp_path):
    # 4 chains of 16 blocks of 16 KiB; a client may pin 40 blocks' worth (640 KiB) by prefetch.
    d, chains = on_ssd(daemon_factory, tmp_path, n_chains=4,
                        extra=("--max-prefetch-bytes-per-client", str(40 * BB)))
    from kvstore.client.errors import ResourceExhausted
    with KVClient(d.socket) as c, KVClient(d.socket) as other:
        ns = c.namespace("m", LAYOUT)
        first = ns.prefetch_many([(chains[0][0], 30.0), (chains[1][0], 30.0)])   # 32 blocks
        with pytest.raises(ResourceExhausted, match="max_prefetch_bytes_per_client"):
            ns.prefetch(chains[2][0], 30.0)                     # 48 > 40: refused, whole
        assert c.stats().prefetch_pending == 2
        # another client has its own share
        t = other.namespace("m", LAYOUT).prefetch(chains[2][0], 30.0)
        assert t.blocks == 16
        # a get ends a prefetch and gives its bytes back to the client's share
        assert get_exact(ns, *chains[0]) == 16
        assert ns.prefetch(chains[3][0], 30.0).blocks == 16    # 32 <= 40 again
        assert ns.prefetch(chains[3][0][:8], 30.0).blocks == 8 # blocks it pins already: free
        assert ns.cancel_prefetch(first) == 1                   # chains[1] was still pending
        assert ns.prefetch(chains[2][0], 30.0).blocks == 16


def test_async_clients_prefetch_too(daemon_factory, tmp_path):
    import asyncio

    from kvstore.client import AsyncKVClient
    d, [(keys, data)] = on_ssd(daemon_factory, tmp_path)

    async def main():
        async with AsyncKVClient(d.socket) as c:
            ns = await c.namespace("m", LAYOUT)
            t = await ns.prefetch(keys, deadline_s=5.0)
            assert (t.blocks, t.to_promote) == (16, 16)
            [t2] = await ns.prefetch_many([(keys[:4], 5.0)])
            assert await ns.cancel_prefetch([t2]) == 1
            got = await ns.get(keys)
            assert np.array_equal(np.asarray(got), data)
    asyncio.run(main())
