"""The block table owns block state: pins, removal and freeing go through its methods, and
freeing a block frees its copy in every tier (the composition root's on_free)."""
from __future__ import annotations

import numpy as np
import pytest

from kvstore.core.arena import Arena
from kvstore.core.keys import chain_keys, pack_keys
from kvstore.core.layout import KVLayout
from kvstore.policies.eviction import PrefixAwareLRU, eviction_policy
from kvstore.policies.write import (WriteBack, WriteThrough, WriteThroughSelective,
                                    write_policy)
from kvstore.store.blockstore import BlockStore, TierSet, dram_store
from kvstore.store.table import COMMITTED, DELETED, FREE, NO_SLOT, BlockTable
from kvstore.tiers.base import Tier
from kvstore.tiers.dram import DRAMTier

L = KVLayout(num_layers=1, num_kv_heads=1, head_dim=64, block_tokens=16, dtype="float32")


def chain(seed: bytes, n: int) -> list[bytes]:
    return chain_keys(seed * 16, list(range(n * 16)), 16)


class Recorder:
    """A tier that records which blocks it was asked to forget."""

    name = "TEST"

    def __init__(self):
        self.forgotten: list[int] = []

    def forget(self, bid: int) -> None:
        self.forgotten.append(bid)


def _table_with(n: int, rec: Recorder) -> tuple[BlockTable, list[int]]:
    t = BlockTable(on_free=rec.forget)
    bids = [t.add(0, i.to_bytes(16, "little"), -1, t.tick()) for i in range(n)]
    t.publish(bids)
    return t, bids


def test_unpin_frees_a_deleted_block_once_the_last_pin_goes():
    rec = Recorder()
    t, (a, b) = _table_with(2, rec)
    t.pin([a, a])                       # two pins on one block (a lease and an I/O)
    assert int(t.leases[a]) == 2
    assert t.discard(a) and t.state[a] == DELETED and t.find(0, t.key_of(a)) == -1
    assert rec.forgotten == []          # pinned: not freed yet
    t.unpin([a])
    assert rec.forgotten == [] and t.state[a] == DELETED
    t.unpin([a])
    assert rec.forgotten == [a] and t.state[a] == FREE
    assert not t.discard(a)             # not COMMITTED any more: nothing to do
    assert t.discard(b) and rec.forgotten == [a, b]     # unpinned: freed at once
    assert t.count(0) == 0


def test_committed_prefix_stops_at_the_first_missing_or_uncommitted_block():
    t = BlockTable()
    keys = [i.to_bytes(16, "little") for i in range(100)]
    bids = [t.add(0, k, -1, 1) for k in keys]
    t.publish(bids[:60])
    assert t.committed_prefix(0, keys).tolist() == bids[:60]           # 61st is WRITING
    assert t.committed_prefix(0, keys[:10] + [b"x" * 16]).tolist() == bids[:10]
    assert t.committed_prefix(1, keys).tolist() == []                  # another namespace
    assert t.committed_prefix(0, b"".join(keys[:3])).tolist() == bids[:3]   # a blob too


def test_set_and_clear_ssd_and_restore_many():
    t = BlockTable()
    (b,) = [t.add(0, bytes(16), -1, 1)]
    t.set_ssd(b, 7 << 32 | 3, 1234)
    assert (int(t.ssd[b]), int(t.csum[b])) == (7 << 32 | 3, 1234)
    assert t.clear_ssd(b) == 7 << 32 | 3 and t.ssd[b] == NO_SLOT
    keys = np.arange(1, 9, dtype=np.uint64).repeat(2).reshape(-1, 2)
    parents = np.zeros_like(keys)
    parents[1:] = keys[:-1]                                          # one chain
    got = t.restore_many(0, keys.tobytes(), np.arange(8), np.arange(8, dtype=np.uint64),
                         np.arange(8, dtype=np.uint32), parents)
    assert (t.state[got] == COMMITTED).all() and (t.ssd[got] == np.arange(8)).all()
    assert t.parent[got[0]] == -1 and (t.parent[got[1:]] == got[:-1]).all()
    assert (t.children[got[:-1]] == 1).all() and t.children[got[-1]] == 0


def test_every_tier_copy_is_freed_with_the_block(shm_dir):
    """The wiring the daemon's composition root does: the table frees through a TierSet."""
    arena = Arena.create(1 << 20, shm_dir)
    try:
        rec = Recorder()
        copies = TierSet()
        table = BlockTable(on_free=copies.forget)
        dram = DRAMTier(arena, table, 256 << 10)
        copies.add(dram)
        copies.add(rec)
        store = BlockStore(table, dram)
        ns = store.register_namespace("m", L)
        s = store.open_session()
        keys = chain(b"t", 3)
        aid, offs = store.allocate(s.session_id, ns.namespace_id, pack_keys(keys))
        store.commit(s.session_id, aid)
        assert dram.used_bytes() == 3 * L.slot_bytes and dram.blocks() == 3
        gone = [table.find(ns.index, k) for k in keys[:2]]
        assert store.delete(ns.namespace_id, pack_keys(keys[:2])) == 2
        assert sorted(rec.forgotten) == sorted(gone)       # every tier heard of both
        assert dram.used_bytes() == L.slot_bytes and dram.blocks() == 1
    finally:
        arena.close()


def test_tiers_implement_the_protocol(shm_dir, tmp_path):
    from kvstore.tiers.hbm import HBMTier, HostPool
    from kvstore.tiers.ssd.catalog import SSDCatalog
    from kvstore.tiers.ssd.files import SlabFiles
    from kvstore.tiers.ssd.journal import Journal
    from kvstore.tiers.ssd.space import SSDSpace
    from kvstore.tiers.ssd.tier import SSDTier
    from kvstore.tiers.remote.tier import RemoteTier

    arena = Arena.create(1 << 20, shm_dir)
    files = SlabFiles(tmp_path / "ssd", 1 << 20, 1 << 20, io_threads=1)
    pool = HostPool(1 << 20, shm_dir)
    try:
        table = BlockTable()
        dram = DRAMTier(arena, table, 256 << 10)
        files.open()
        catalog = SSDCatalog(table, files, Journal(files.directory / "journal", files.pool))
        ssd = SSDTier(table, dram, files, catalog, SSDSpace(table, files, catalog))
        hbm = HBMTier(pool, table, dram, 256 << 10)
        for tier, name in ((dram, "DRAM"), (ssd, "SSD"), (hbm, "HBM")):
            assert isinstance(tier, Tier) and tier.name == name
            row = tier.stats_row()
            assert row.capacity_bytes == tier.capacity_bytes() > 0
            assert row.used_bytes == tier.used_bytes() == 0 and row.blocks == tier.blocks() == 0
        assert isinstance(RemoteTier, type) and all(
            hasattr(RemoteTier, m) for m in ("name", "capacity_bytes", "used_bytes", "blocks",
                                             "forget", "stats_row"))
        store = BlockStore(table, dram, ssd=ssd, hbm=hbm)
        assert [t.name for t in store.tiers()] == ["HBM", "DRAM", "SSD"]
        catalog.journal.close()
    finally:
        files.close()
        pool.close()
        arena.close()


def test_write_policies_by_name():
    assert isinstance(write_policy("write_through"), WriteThrough)
    assert isinstance(write_policy("Write-Back"), WriteBack)
    sel = write_policy("write_through_selective", write_hits=3)
    assert isinstance(sel, WriteThroughSelective)
    assert sel.due(np.array([0, 2, 3, 9])).tolist() == [False, False, True, True]
    assert not WriteThrough().due(np.array([9])).any()
    assert (WriteThrough().on_commit, WriteBack().on_commit) == (True, False)
    assert (WriteThrough().on_eviction, WriteBack().on_eviction) == (False, True)
    with pytest.raises(ValueError, match="must be write_through, write_back or "
                                         "write_through_selective, got 'lru'"):
        write_policy("lru")
    with pytest.raises(ValueError, match="must be write_through or write_through_selective"):
        write_policy("write_back", allowed=("write_through", "write_through_selective"))


def test_prefix_aware_lru_order():
    """Oldest first; within one touch, leaves before their parents, deeper before shallower."""
    t = BlockTable()
    old = t.add(0, b"o" * 16, -1, 1)
    root = t.add(0, b"r" * 16, -1, 5)
    mid = t.add(0, b"m" * 16, root, 5)
    leaf = t.add(0, b"l" * 16, mid, 5)
    other = t.add(0, b"x" * 16, -1, 5)     # a leaf at depth 0
    cands = np.array([root, mid, leaf, other, old], dtype=np.int64)
    order = eviction_policy("lru_prefix").order(t, cands).tolist()
    assert order == [old, leaf, other, mid, root]
    assert isinstance(eviction_policy(), PrefixAwareLRU)
    with pytest.raises(ValueError, match="must be one of lru_prefix"):
        eviction_policy("fifo")


def test_dram_store_wires_a_table_that_frees_dram_slots(shm_dir):
    arena = Arena.create(1 << 20, shm_dir)
    try:
        store = dram_store(arena, chunk_bytes=256 << 10)
        ns = store.register_namespace("m", L)
        s = store.open_session()
        aid, _ = store.allocate(s.session_id, ns.namespace_id, pack_keys(chain(b"d", 4)))
        store.commit(s.session_id, aid)
        assert store.dram.used_bytes() == 4 * L.slot_bytes
        store.delete(ns.namespace_id, pack_keys(chain(b"d", 4)))
        assert store.dram.used_bytes() == 0 and store.table.count() == 0
    finally:
        arena.close()
