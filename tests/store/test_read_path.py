"""The get path in one process (kvstore.store.reads.ReadPath): lookup across DRAM and then the
cluster tier under its deadline, the remote fill, the lease, promotion from SSD, the hit
observers, and lease expiry on a fake clock. Real tier objects, no daemon, no gRPC
(support/paths.py); the real-process tests of the same steps stay in tests/daemon,
tests/tiers and tests/prefetch."""
from __future__ import annotations

import asyncio
import time

import pytest

from support.paths import LEASE_S, MemoryEngine, block, build, chain

from kvstore.core.errors import FailedPrecondition, InvalidArgument, Reason
from kvstore.core.keys import pack_keys
from kvstore.store.table import NO_SLOT


def run(coro):
    return asyncio.run(coro)


def test_a_dram_get_leases_answers_the_bytes_and_tells_each_observer_once(shm_dir, tmp_path):
    async def go():
        p = build(shm_dir, tmp_path)
        try:
            keys = chain(4, seed=1)
            assert await p.put(keys, fill=1) == 4
            assert await p.reads.lookup(p.ns.namespace_id, pack_keys(keys)) == (4, ["DRAM"] * 4)
            got = await p.reads.get(p.sid, p.ns.namespace_id, pack_keys(keys + chain(1, 9)))
            assert got.tiers == ["DRAM"] * 4 and got.generations == []   # no generation table
            assert p.read(got.offsets) == [block(1, i) for i in range(4)]
            assert p.seen.hits == [got.lease.block_ids]           # once, with every hit
            assert (p.store.table.leases[got.lease.block_ids] == 1).all()
            p.reads.release(p.sid, got.lease.lease_id)
            assert (p.store.table.leases[got.lease.block_ids] == 0).all()
            # a miss leases nothing and tells nobody
            none = await p.reads.get(p.sid, p.ns.namespace_id, pack_keys(chain(2, 8)))
            assert none.lease is None and none.offsets == [] and none.tiers == []
            assert len(p.seen.hits) == 1
        finally:
            await p.close()
    run(go())


def test_lease_free_reads_reported_reach_the_same_observers(shm_dir, tmp_path):
    async def go():
        p = build(shm_dir, tmp_path)
        try:
            keys = chain(3, seed=2)
            await p.put(keys, fill=2)
            bids = p.store.table.find_many(p.ns.index, keys).tolist()
            assert p.reads.report_reads(p.ns.namespace_id, pack_keys(keys), misses=1) == 3
            assert p.seen.hits == [bids]
            assert p.store.table.hits[bids].tolist() == [1, 1, 1]
            # keys no longer stored are not counted and reach no observer
            assert p.reads.report_reads(p.ns.namespace_id, pack_keys(chain(2, 7))) == 0
            assert p.seen.hits == [bids]
        finally:
            await p.close()
    run(go())


def test_an_expired_lease_unpins_and_its_late_release_is_refused(shm_dir, tmp_path):
    async def go():
        p = build(shm_dir, tmp_path)
        try:
            keys = chain(2, seed=3)
            await p.put(keys, fill=3)
            got = await p.reads.get(p.sid, p.ns.namespace_id, pack_keys(keys))
            assert got.lease.deadline == p.clock.t + LEASE_S
            p.clock.t += LEASE_S - 0.5
            p.store.expire()
            assert (p.store.table.leases[got.lease.block_ids] == 1).all()   # not yet
            p.clock.t += 1.0
            p.store.expire()
            assert (p.store.table.leases[got.lease.block_ids] == 0).all()
            assert p.store.counters.leases_expired == 1
            with pytest.raises(FailedPrecondition) as e:
                p.reads.release(p.sid, got.lease.lease_id)
            assert e.value.reason == Reason.EXPIRED_LEASE
        finally:
            await p.close()
    run(go())


def test_a_get_of_ssd_blocks_promotes_them_and_the_lease_clock_starts_after(shm_dir, tmp_path):
    async def go():
        p = build(shm_dir, tmp_path, ssd=True)
        try:
            old = chain(4, seed=4)
            await p.put(old, fill=4)                  # write_through: on SSD once committed
            bids = p.store.table.find_many(p.ns.index, old)
            assert (p.store.table.ssd[bids] != NO_SLOT).all()
            await p.put(chain(256, seed=5), fill=5)   # fills DRAM: the old chain is demoted
            assert (p.store.table.dram[bids] == NO_SLOT).all()
            assert await p.reads.lookup(p.ns.namespace_id, pack_keys(old)) == (4, ["SSD"] * 4)
            p.clock.t += 5.0
            got = await p.reads.get(p.sid, p.ns.namespace_id, pack_keys(old))
            assert got.tiers == ["SSD"] * 4 and min(got.offsets) >= 0
            assert p.read(got.offsets) == [block(4, i) for i in range(4)]
            assert (p.store.table.dram[bids] == got.offsets).all()
            assert got.lease.deadline == p.clock.t + LEASE_S
            assert p.seen.hits == [bids.tolist()]
            assert p.ssd.counters.hits == 4
            p.reads.release(p.sid, got.lease.lease_id)
        finally:
            await p.close()
    run(go())


def test_lookup_continues_in_the_remote_tier_and_the_get_fills_from_it(shm_dir, tmp_path):
    async def go():
        engine = MemoryEngine()
        p = build(shm_dir, tmp_path, engine=engine)
        try:
            keys = chain(5, seed=6)
            await p.put(keys[:2], fill=6)             # the local prefix
            for i, k in enumerate(keys[2:], 2):       # another host stored the rest
                engine.hold(p.ns.namespace_id, k, block(6, i))
            assert await p.reads.lookup(p.ns.namespace_id, pack_keys(keys)) == \
                (5, ["DRAM"] * 2 + ["REMOTE"] * 3)
            got = await p.reads.get(p.sid, p.ns.namespace_id, pack_keys(keys))
            assert got.tiers == ["DRAM"] * 2 + ["REMOTE"] * 3
            assert p.read(got.offsets) == [block(6, i) for i in range(5)]
            assert p.seen.hits == [got.lease.block_ids] and len(got.lease.block_ids) == 5
            assert p.remote.counters.hits == 3
            p.reads.release(p.sid, got.lease.lease_id)
            # now local: the next lookup does not ask the engine
            calls = engine.exists_calls
            assert await p.reads.lookup(p.ns.namespace_id, pack_keys(keys)) == (5, ["DRAM"] * 5)
            assert engine.exists_calls == calls
        finally:
            await p.close()
    run(go())


def test_a_stalled_remote_costs_the_lookup_its_deadline_not_the_answer(shm_dir, tmp_path):
    async def go():
        engine = MemoryEngine()
        p = build(shm_dir, tmp_path, engine=engine, remote_deadline_s=0.2)
        try:
            keys = chain(4, seed=7)
            await p.put(keys[:2], fill=7)
            engine.hold(p.ns.namespace_id, keys[2], block(7, 2))
            engine.stall.set()
            t0 = time.monotonic()
            assert await p.reads.lookup(p.ns.namespace_id, pack_keys(keys)) == (2, ["DRAM"] * 2)
            assert time.monotonic() - t0 < 2.0        # generous: the deadline is 0.2 s
            assert p.remote.counters.timeouts == 1
            engine.release.set()
        finally:
            await p.close()
    run(go())


def test_a_cancelled_get_leaves_nothing_pinned(shm_dir, tmp_path):
    """The client's deadline cancels the get during its promotion: the lease is abandoned."""
    async def go():
        p = build(shm_dir, tmp_path, ssd=True)
        try:
            old = chain(3, seed=8)
            await p.put(old, fill=8)
            await p.put(chain(256, seed=9), fill=9)
            bids = p.store.table.find_many(p.ns.index, old)
            assert (p.store.table.dram[bids] == NO_SLOT).all()
            task = asyncio.ensure_future(p.reads.get(p.sid, p.ns.namespace_id, pack_keys(old)))
            for _ in range(3):        # into the promotion's SSD read
                await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.sleep(0.2)  # the shared SSD read finishes on its own
            assert (p.store.table.leases[bids] == 0).all()
            assert p.store.active_leases() == 0
        finally:
            await p.close()
    run(go())


def test_bad_input_raises_the_stores_error_and_tells_no_observer(shm_dir, tmp_path):
    async def go():
        p = build(shm_dir, tmp_path)
        try:
            with pytest.raises(InvalidArgument):
                await p.reads.get(p.sid, p.ns.namespace_id, b"\x00" * 7)
            with pytest.raises(InvalidArgument):
                await p.reads.lookup(p.ns.namespace_id, b"\x00" * 7)
            with pytest.raises(FailedPrecondition) as e:
                p.reads.prefetch(p.sid, p.ns.namespace_id, [(pack_keys(chain(1, 1)), 1.0)])
            assert e.value.reason == Reason.NOT_ENABLED
            assert p.seen.hits == []
        finally:
            await p.close()
    run(go())


def test_the_planner_sees_the_tiers_a_lookup_finds(shm_dir, tmp_path):
    from kvstore.planner.recompute import PrefillProfile

    async def go():
        p = build(shm_dir, tmp_path)
        try:
            keys = chain(3, seed=10)
            await p.put(keys, fill=10)
            lookups = p.store.counters.lookups
            got = await p.reads.plan(p.ns.namespace_id, pack_keys(keys + chain(2, 11)),
                                     PrefillProfile(0.0, 1e-4, 0.0), 0.0)
            assert got.tiers == ["DRAM"] * 3 and got.bandwidth["DRAM"] == 10e9
            assert got.plan.load_blocks_from + got.plan.recompute_tokens // 16 <= 3
            assert p.store.counters.lookups == lookups + 1
        finally:
            await p.close()
    run(go())
