"""The put path in one process (kvstore.store.writes.WritePath): allocate, copy, commit, the
commit observers, write-through to SSD before the commit answers, the cluster tier's queue and
flush, deletes. Real tier objects, no daemon, no gRPC (support/paths.py); the real-process
tests of the same steps stay in tests/daemon and tests/tiers."""
from __future__ import annotations

import asyncio
import mmap

import pytest

from support.paths import MemoryEngine, block, build, chain

from kvstore.core.errors import FailedPrecondition, InvalidArgument, Reason
from kvstore.core.keys import pack_keys
from kvstore.store.blockstore import ALREADY_STORED
from kvstore.store.table import NO_SLOT
from kvstore.tiers.remote.codec import remote_key


def run(coro):
    return asyncio.run(coro)


def test_a_commit_publishes_and_tells_each_observer_once(shm_dir, tmp_path):
    async def go():
        p = build(shm_dir, tmp_path)
        try:
            keys = chain(3, seed=1)
            assert await p.put(keys, fill=1) == 3
            bids = p.store.table.find_many(p.ns.index, keys).tolist()
            assert p.seen.commits == [bids]
            # the stored keys are skipped, only the new one is written and observed
            more = keys + chain(1, 2)
            aid, offs = await p.writes.allocate(p.sid, p.ns.namespace_id, pack_keys(more))
            assert offs[:3] == [ALREADY_STORED] * 3 and offs[3] >= 0
            assert await p.writes.commit(p.sid, aid) == 1
            assert p.seen.commits[1] == [p.store.table.find(p.ns.index, more[3])]
            # an abort publishes nothing and tells nobody
            aid, _ = await p.writes.allocate(p.sid, p.ns.namespace_id, pack_keys(chain(2, 3)))
            assert await p.writes.commit(p.sid, aid, abort=True) == 0
            assert len(p.seen.commits) == 2
            assert (await p.reads.lookup(p.ns.namespace_id, pack_keys(chain(2, 3))))[0] == 0
        finally:
            await p.close()
    run(go())


def test_write_through_commits_answer_once_the_blocks_are_on_ssd(shm_dir, tmp_path):
    async def go():
        p = build(shm_dir, tmp_path, ssd=True)
        try:
            keys = chain(4, seed=4)
            await p.put(keys, fill=4)
            bids = p.store.table.find_many(p.ns.index, keys)
            assert (p.store.table.ssd[bids] != NO_SLOT).all()   # no wait after the commit
            for i, (k, b) in enumerate(zip(keys, bids.tolist())):    # the bytes, checksummed
                buf = mmap.mmap(-1, 4096)
                assert p.ssd.slabs.read_slot(int(p.store.table.ssd[b]), memoryview(buf), k,
                                             len(block(4, i)), int(p.store.table.csum[b]))
                assert buf[:len(block(4, i))] == block(4, i)
            # a delete that answered is journaled: a fresh tier over the files would not
            # find the blocks again
            assert await p.writes.delete(p.ns.namespace_id, pack_keys(keys[2:])) == 2
            assert await p.reads.lookup(p.ns.namespace_id, pack_keys(keys)) == (2, ["DRAM"] * 2)
        finally:
            await p.close()
    run(go())


def test_commits_reach_the_remote_tier_and_flush_waits_until_placed(shm_dir, tmp_path):
    async def go():
        engine = MemoryEngine()
        p = build(shm_dir, tmp_path, engine=engine)
        try:
            keys = chain(3, seed=5)
            await p.put(keys, fill=5)
            placed, timed_out = await p.writes.flush_remote(p.sid, p.ns.namespace_id,
                                                            pack_keys(keys), 5.0)
            assert placed == [True] * 3 and not timed_out
            for i, k in enumerate(keys):
                assert engine.values[remote_key(p.ns.namespace_id, k)][1] == block(5, i)
        finally:
            await p.close()
    run(go())


def test_flush_without_a_remote_tier_or_with_a_bad_deadline_is_refused(shm_dir, tmp_path):
    async def go():
        p = build(shm_dir, tmp_path)
        try:
            with pytest.raises(FailedPrecondition) as e:
                await p.writes.flush_remote(p.sid, p.ns.namespace_id, pack_keys(chain(1, 1)))
            assert e.value.reason == Reason.NOT_ENABLED
        finally:
            await p.close()
        engine = MemoryEngine()
        p = build(shm_dir, tmp_path, engine=engine)
        try:
            for bad in (-1.0, 601.0, float("nan")):
                with pytest.raises(InvalidArgument) as e:
                    await p.writes.flush_remote(p.sid, p.ns.namespace_id,
                                                pack_keys(chain(1, 1)), bad)
                assert e.value.reason == Reason.BAD_ARGUMENT
        finally:
            await p.close()
    run(go())


def test_an_allocation_expires_on_the_fake_clock_and_frees_its_slots(shm_dir, tmp_path):
    async def go():
        p = build(shm_dir, tmp_path)
        try:
            used = p.store.dram.slabs.used_bytes()
            aid, offs = await p.writes.allocate(p.sid, p.ns.namespace_id, pack_keys(chain(2, 6)))
            assert p.store.dram.slabs.used_bytes() == used + 2 * 4096
            p.clock.t += 11.0
            p.store.expire()
            assert p.store.counters.allocations_expired == 1
            with pytest.raises(FailedPrecondition) as e:
                await p.writes.commit(p.sid, aid)
            assert e.value.reason == Reason.UNKNOWN_ALLOCATION
            assert p.seen.commits == []
        finally:
            await p.close()
    run(go())
