"""The daemon's own DRAM→HBM copies (a prefetch with to_hbm: HBMTier.copy_in) pin their source
for their whole duration: the prefetch that asked may end mid-copy (a get, a cancel, expiry),
and a source slot evicted and reused under the copy would make a torn copy the block's HBM copy.

In-process, over the HBM tier's CPU stand-in (the ``host`` pool); the pool's copy is held at a
gate (a test build of the device copy) so the prefetch ends while it runs."""
from __future__ import annotations

import asyncio
import threading

import numpy as np

from kvstore.core.arena import Arena
from kvstore.core.layout import KVLayout
from kvstore.store.blockstore import BlockStore, TierSet
from kvstore.store.table import BlockTable
from kvstore.tiers.dram import DRAMTier
from kvstore.tiers.hbm import HBMTier, HostPool

LAYOUT = KVLayout(2, 4, 64, block_tokens=16, dtype="uint8")     # 16 KiB blocks
BB = LAYOUT.block_bytes


class GatedPool(HostPool):
    """The host pool whose copies wait at a gate once started."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.entered = threading.Event()
        self.gate = threading.Event()

    def copy_from_host(self, copies):
        self.entered.set()
        assert self.gate.wait(30)
        super().copy_from_host(copies)


def _put(store: BlockStore, sid: int, ns, key: bytes, fill: int) -> int:
    aid, (off,) = store.allocate(sid, ns.namespace_id, key)
    store.dram.view(off, BB)[:] = bytes([fill]) * BB
    assert store.commit(sid, aid) == 1
    return off


def test_a_prefetch_ending_mid_copy_leaves_the_copy_exact(tmp_path):
    arena = Arena.create(1 << 20, tmp_path)                     # 60 slots of 16 KiB
    pool = GatedPool(1 << 20, tmp_path)
    try:
        copies = TierSet()
        table = BlockTable(on_free=copies.forget)
        dram = DRAMTier(arena, table, 256 << 10)
        hbm = HBMTier(pool, table, dram, 256 << 10)
        copies.add(dram)
        copies.add(hbm)
        store = BlockStore(table, dram, hbm=hbm)
        sid = store.open_session().session_id
        ns = store.register_namespace("m", LAYOUT)
        x_key = b"\x01" * 16
        x_off = _put(store, sid, ns, x_key, 0x11)
        (x,) = table.find_many(ns.index, [x_key]).tolist()

        async def main():
            table.pin([x])                                  # the prefetch's pin
            task = asyncio.ensure_future(hbm.copy_in([x]))
            while not pool.entered.is_set():
                await asyncio.sleep(0.001)
            table.unpin([x])                                # the prefetch ends (a cancel)
            # puts that need every slot: whatever is evictable is evicted and reused
            offs = [_put(store, sid, ns, bytes([2, i]) + b"\0" * 14, 0x40 + i)
                    for i in range(80)]
            assert x_off not in offs, "the copy's source slot was reused under it"
            assert store.dram.counters.evictions > 0
            pool.gate.set()
            return await task

        assert asyncio.run(main()) == 1
        assert hbm.has(x) and table.leases[x] == 0          # adopted; its pin undone
        o = hbm.offset(x)
        assert bytes(pool.arena.buffer[o:o + BB]) == b"\x11" * BB
        assert bytes(dram.view(int(table.dram[x]), BB)) == b"\x11" * BB
    finally:
        pool.close()
        arena.close()


def test_a_block_deleted_mid_copy_is_not_adopted_and_is_freed_after(tmp_path):
    arena = Arena.create(1 << 20, tmp_path)
    pool = GatedPool(1 << 20, tmp_path)
    try:
        copies = TierSet()
        table = BlockTable(on_free=copies.forget)
        dram = DRAMTier(arena, table, 256 << 10)
        hbm = HBMTier(pool, table, dram, 256 << 10)
        copies.add(dram)
        copies.add(hbm)
        store = BlockStore(table, dram, hbm=hbm)
        sid = store.open_session().session_id
        ns = store.register_namespace("m", LAYOUT)
        x_off = _put(store, sid, ns, b"\x01" * 16, 0x11)
        (x,) = table.find_many(ns.index, [b"\x01" * 16]).tolist()
        used = dram.used_bytes()

        async def main():
            task = asyncio.ensure_future(hbm.copy_in([x]))
            while not pool.entered.is_set():
                await asyncio.sleep(0.001)
            assert store.delete(ns.namespace_id, b"\x01" * 16) == 1
            # still the copy's source: not freed, its slot not handed out again
            assert dram.used_bytes() == used
            y_off = _put(store, sid, ns, b"\x02" * 16, 0x22)
            assert y_off != x_off
            pool.gate.set()
            return await task

        assert asyncio.run(main()) == 0
        assert not hbm.has(x) and hbm.used_bytes() == 0
        assert dram.used_bytes() == used                    # x freed at the unpin, y holds one
    finally:
        pool.close()
        arena.close()

