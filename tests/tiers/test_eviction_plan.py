"""DRAM eviction as a plan (docs/architecture.md, "Eviction is a plan"): with a write-back SSD
tier the synchronous eviction never writes to SSD; the path awaits the dirty victims' writes
first (BlockStore.clean_room), then the DRAM tier evicts clean victims only. The real store,
DRAM tier, slab files and journal in one event loop, as the composition root wires them."""
from __future__ import annotations

import asyncio
import os

import pytest

from kvstore.core.arena import Arena
from kvstore.core.errors import ResourceExhausted
from kvstore.core.layout import KVLayout
from kvstore.policies.write import WriteBack
from kvstore.store.blockstore import BlockStore, TierSet
from kvstore.store.table import BlockTable
from kvstore.tiers.base import NO_SLOT
from kvstore.tiers.dram import DRAMTier
from kvstore.tiers.ssd.catalog import SSDCatalog
from kvstore.tiers.ssd.files import SlabFiles
from kvstore.tiers.ssd.journal import Journal
from kvstore.tiers.ssd.space import SSDSpace
from kvstore.tiers.ssd.tier import SSDTier

LAYOUT = KVLayout(1, 1, 64, 16, "uint8")          # 2 KiB blocks in 4 KiB slots
BB = LAYOUT.block_bytes


def _key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def test_a_write_back_eviction_writes_only_when_awaited_and_demotes(tmp_path, shm_dir):
    arena = Arena.create(4 << 20, shm_dir)
    copies = TierSet()
    table = BlockTable(on_free=copies.forget)
    dram = DRAMTier(arena, table, 1 << 20)
    files = SlabFiles(tmp_path / "ssd", 8 << 20, 4 << 20, io_threads=2)
    files.open()
    catalog = SSDCatalog(table, files, Journal(files.directory / "journal", files.pool))
    ssd = SSDTier(table, dram, files, catalog, SSDSpace(table, files, catalog), WriteBack())
    copies.add(dram)
    copies.add(ssd)
    store = BlockStore(table, dram, ssd=ssd)
    ssd.recover(store.register_namespace)

    async def run() -> None:
        s = store.open_session()
        ns = store.register_namespace("m", LAYOUT)
        n_slots = dram.capacity_bytes() // LAYOUT.slot_bytes
        data = {}
        for i in range(n_slots):                       # DRAM full of dirty blocks
            aid, offs = store.allocate(s.session_id, ns.namespace_id, _key(i))
            data[i] = os.urandom(BB)
            arena.buffer[offs[0]:offs[0] + BB] = data[i]
            store.commit(s.session_id, aid)            # write-back: nothing written yet
        assert files.counters.writes == 0

        # Synchronous: no SSD write on the event loop, and no dirty block is dropped for it.
        new = _key(n_slots)
        with pytest.raises(ResourceExhausted):
            store.allocate(s.session_id, ns.namespace_id, new)
        assert files.counters.writes == 0
        assert all(table.dram[table.find(ns.index, _key(i))] != NO_SLOT for i in range(n_slots))

        # The plan: the victim's write is awaited, then the eviction demotes it.
        await store.clean_room_for(s.session_id, ns.namespace_id, new)
        assert files.counters.writes == 1
        victim = next(i for i in range(n_slots) if table.ssd[table.find(ns.index, _key(i))]
                      != NO_SLOT)
        aid, offs = store.allocate(s.session_id, ns.namespace_id, new)
        assert offs[0] >= 0 and files.counters.writes == 1
        bid = table.find(ns.index, _key(victim))
        assert table.dram[bid] == NO_SLOT and table.ssd[bid] != NO_SLOT     # demoted
        assert dram.counters.demotions == ssd.counters.demotions == 1
        assert dram.counters.evictions == 1
        arena.buffer[offs[0]:offs[0] + BB] = data.setdefault(n_slots, os.urandom(BB))
        store.commit(s.session_id, aid)                # DRAM full again, every block dirty

        # Promoted back through the slots the DRAM tier lends: the bytes are the victim's.
        lease, _, tiers = store.acquire(s.session_id, ns.namespace_id, _key(victim),
                                        promote_out=(promote := []))
        assert tiers == ["SSD"] and promote == [0]
        lease, offsets = await store.promote(s.session_id, lease, promote)
        assert lease is not None and offsets[0] >= 0
        assert bytes(arena.buffer[offsets[0]:offsets[0] + BB]) == data[victim]
        store.release(s.session_id, lease.lease_id)
        assert ssd.counters.promotions == 1 and ssd.counters.misses == 0
        # The promotion's room came from the plan too: one more victim written, then demoted.
        assert files.counters.writes == 2 and ssd.counters.demotions == 2
        for i, want in data.items():                   # nothing lost, every byte its own
            bid = table.find(ns.index, _key(i))
            assert bid >= 0
            if table.dram[bid] != NO_SLOT:
                off = int(table.dram[bid])
                assert bytes(arena.buffer[off:off + BB]) == want
            else:
                assert table.ssd[bid] != NO_SLOT
        await ssd.close()

    try:
        asyncio.run(run())
    finally:
        arena.close()
