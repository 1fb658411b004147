"""kvstore.store.fills.StoreFillSlots — the FillSlots the remote tier is handed instead of the
store — over a real BlockStore and arena, without a server: a fill is a put of the daemon's own
that publishes only the verified blocks, and hands back every slot it did not publish."""
import asyncio

import pytest

from kvstore.core.arena import Arena
from kvstore.core.errors import ResourceExhausted
from kvstore.core.keys import chain_keys, pack_keys
from kvstore.core.layout import KVLayout
from kvstore.store.blockstore import ALREADY_STORED, dram_store
from kvstore.store.fills import StoreFillSlots
from kvstore.tiers.remote.slots import BlockRef, SlotNamespace

L = KVLayout(num_layers=1, num_kv_heads=1, head_dim=64, block_tokens=16, dtype="float32")  # 8 KiB


@pytest.fixture
def env(shm_dir):
    arena = Arena.create(1 << 20, shm_dir)   # 128 slots of 8 KiB
    store = dram_store(arena, chunk_bytes=256 << 10)
    ns = store.register_namespace("m", L)
    yield store, ns, StoreFillSlots(store)
    arena.close()


def chain(n, start=0):
    return chain_keys(b"s" * 16, list(range(start, start + n * 16)), 16)


def test_a_fill_publishes_only_the_kept_blocks_and_frees_the_rest(env):
    store, ns, slots = env
    keys = chain(4)
    sns, got, n = slots.prefix(ns.namespace_id, pack_keys(keys))
    assert sns == SlotNamespace(ns.namespace_id, L.block_bytes) and got == keys and n == 0
    free0 = store.dram.used_bytes()
    fill = asyncio.run(slots.open_fill(sns, keys, b""))
    assert len(fill.offsets) == 4 and all(o >= 0 for o in fill.offsets)
    for i, o in enumerate(fill.offsets):
        slots.arena[o:o + L.block_bytes] = bytes([i + 1]) * L.block_bytes
    # placeholders: invisible to lookups, and a second fill of the same keys skips them
    assert store.lookup(ns.namespace_id, pack_keys(keys))[0] == 0
    other = asyncio.run(slots.open_fill(sns, keys, b""))
    assert other.offsets == [ALREADY_STORED] * 4
    other.close()
    committed = fill.publish([True, True, False, True])
    fill.close()
    assert len(committed) == 3
    # the dropped block ends the committed prefix; its slot is free again
    assert store.lookup(ns.namespace_id, pack_keys(keys))[0] == 2
    assert store.dram.used_bytes() - free0 == 3 * L.slot_bytes
    refs = slots.refs(committed + [-1])
    assert refs[-1] is None
    assert [r.offset for r in refs[:3]] == [fill.offsets[i] for i in (0, 1, 3)]
    assert refs[2] == BlockRef(ns.namespace_id, keys[3], fill.offsets[3], L.block_bytes)
    assert bytes(slots.arena[refs[2].offset:refs[2].offset + 4]) == b"\x04" * 4
    sns2, _, bids = slots.find(ns.namespace_id, pack_keys(keys))
    assert sns2 == sns and bids[:2] == committed[:2] and bids[2] == -1 and bids[3] == committed[2]
    assert list(slots.hits(committed)) == [0, 0, 0]


def test_a_fill_that_publishes_nothing_or_is_closed_unpublished_holds_no_slot(env):
    store, ns, slots = env
    sns = SlotNamespace(ns.namespace_id, L.block_bytes)
    used0 = store.dram.used_bytes()
    fill = asyncio.run(slots.open_fill(sns, chain(3), b""))
    assert fill.publish([False, False, False]) == []
    fill.close()
    fill = asyncio.run(slots.open_fill(sns, chain(3, 100), b""))
    fill.close()                              # no publish: the engine call failed
    fill.close()                              # closing twice is harmless
    assert store.dram.used_bytes() == used0
    assert store.lookup(ns.namespace_id, pack_keys(chain(3) + chain(3, 100)))[0] == 0
    assert not store.sessions                # each fill's own session ended with it


def test_a_fill_with_no_room_raises_and_leaves_no_session(env):
    store, ns, slots = env
    sns = SlotNamespace(ns.namespace_id, L.block_bytes)
    s = store.open_session("reader", 1)
    keys = chain(128, 5000)
    fill = asyncio.run(slots.open_fill(sns, keys, b""))
    fill.publish([True] * 128)
    fill.close()
    lease, _, _ = store.acquire(s.session_id, ns.namespace_id, pack_keys(keys))   # all leased
    assert len(lease.block_ids) == 128
    with pytest.raises(ResourceExhausted):
        asyncio.run(slots.open_fill(sns, chain(2, 9000), b""))
    assert set(store.sessions) == {s.session_id}
    slots.pin(lease.block_ids[:1])
    slots.unpin(lease.block_ids[:1])
