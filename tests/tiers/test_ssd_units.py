"""The SSD tier's parts on real files, without a daemon: journal replay, slot I/O, the index."""
from __future__ import annotations

import mmap
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.store.table import BlockTable
from kvstore.tiers.ssd import journal as jr
from kvstore.tiers.ssd.files import SlabFiles
from kvstore.tiers.ssd.format import SSDFormatError


def _puts(addrs, key_base=0):
    e = np.zeros(len(addrs), dtype=jr.PUT_DTYPE)
    e["addr"] = addrs
    e["key"][:, 0] = np.arange(len(addrs)) + key_base
    e["csum"] = 7
    return e


def _ns():
    return jr.NamespaceRecord(b"n" * 16, "m", "", {"num_layers": 1})


def test_journal_last_event_per_slot_wins_and_torn_tail_is_cut(tmp_path):
    pool = ThreadPoolExecutor(1)
    j = jr.Journal(tmp_path / "journal", pool)
    j.rewrite([jr.encode_ns(_ns()), jr.encode_seg(0, 4096),
               jr.encode_puts(_puts([1, 2, 3])),          # keys 0, 1, 2
               jr.encode_del(2),
               jr.encode_puts(_puts([3], key_base=100)),  # slot 3 reused by key 100
               jr.encode_del(9)])                         # unknown slot: ignored
    j.close()
    whole = (tmp_path / "journal").read_bytes()
    with open(tmp_path / "journal", "ab") as f:           # a crash mid-append
        f.write(jr.encode_puts(_puts([5]))[:-7])
    st_ = jr.Journal(tmp_path / "journal", pool).replay()
    assert st_.truncated_bytes > 0 and st_.segments == {0: 4096}
    live = {int(a): int(k) for a, k in zip(st_.puts["addr"], st_.puts["key"][:, 0])}
    assert live == {1: 0, 3: 100}
    # a flipped bit in the middle: replay stops there, nothing after it is trusted
    bad = bytearray(whole)
    bad[len(whole) // 2] ^= 1
    (tmp_path / "journal").write_bytes(bytes(bad))
    assert jr.Journal(tmp_path / "journal", pool).replay().records < 6
    pool.shutdown()


def test_slot_write_read_checksum(tmp_path):
    ssd = SlabFiles(tmp_path, 1 << 20, 1 << 20, io_threads=2)
    ssd.open()
    try:
        ssd.assign_segment(0, 8192)
        addr = ssd.allocate(8192)
        buf = mmap.mmap(-1, 8192)
        buf[:] = os.urandom(8192)
        key = os.urandom(16)
        csum = ssd.write_slot(addr, memoryview(buf), key, 8000)
        out = mmap.mmap(-1, 8192)
        assert ssd.read_slot(addr, memoryview(out), key, 8000, csum)
        assert out[:8000] == buf[:8000]
        assert not ssd.read_slot(addr, memoryview(out), os.urandom(16), 8000, csum)  # other key
    finally:
        ssd.close()
    with pytest.raises(SSDFormatError, match="segments of"):
        SlabFiles(tmp_path, 1 << 20, 512 << 10).open()
    again = SlabFiles(tmp_path, 4 << 20)          # segment size 0: adopt the directory's own
    again.open()
    assert (again.segment_bytes, again.n_segments) == (1 << 20, 4)
    again.close()


def test_auto_segment_size_keeps_file_count_small():
    from kvstore.tiers.ssd.format import auto_segment_bytes
    assert auto_segment_bytes(8 << 20) == 8 << 20            # tiny: one segment
    assert auto_segment_bytes(1 << 30) == 64 << 20
    assert auto_segment_bytes(1 << 40) == 16 << 30            # 1 TiB: 64 files


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 2), st.integers(0, 60)), max_size=300))
def test_index_matches_a_dict(ops):
    """Adds and removals against a dict model: every key resolves to its block, per namespace."""
    idx = BlockTable(16)
    model: dict[tuple[int, bytes], int] = {}
    for add, ns, k in ops:
        key = k.to_bytes(16, "little")
        if add and (ns, key) not in model:
            model[(ns, key)] = idx.add(ns, key, -1, 1)
        elif not add and (ns, key) in model:
            bid = model.pop((ns, key))
            idx.drop_writing(bid)
    for ns in range(3):
        keys = [k.to_bytes(16, "little") for k in range(61)]
        got = idx.find_many(ns, keys).tolist()
        assert got == [model.get((ns, key), -1) for key in keys]
        assert idx.count(ns) == sum(1 for (n, _) in model if n == ns)


@pytest.mark.gpu
def test_gds_path_matches_host_path(tmp_path):
    """kvikio (GDS) and the host O_DIRECT path read each other's slots, checksums included."""
    from kvstore.tiers.ssd import gds
    if not gds.available():
        pytest.skip("needs CUDA and kvikio (the gds extra)")
    import torch
    ssd = SlabFiles(tmp_path, 1 << 20, 1 << 20, io_threads=2)
    ssd.open()
    io = gds.KvikioSlotIO(ssd)
    try:
        ssd.assign_segment(0, 8192)
        key = os.urandom(16)
        src = torch.randint(0, 256, (8192,), dtype=torch.uint8, device="cuda")
        a = ssd.allocate(8192)
        csum = io.write_slot(a, src, key, 8000)
        host = mmap.mmap(-1, 8192)
        assert ssd.read_slot(a, memoryview(host), key, 8000, csum)        # GDS -> host path
        assert bytes(host[:8000]) == src[:8000].cpu().numpy().tobytes()
        b = ssd.allocate(8192)
        csum_b = ssd.write_slot(b, memoryview(host), key, 8000)           # host -> GDS path
        dst = torch.empty(8192, dtype=torch.uint8, device="cuda")
        assert io.read_slot(b, dst, key, 8000, csum_b)
        assert torch.equal(dst[:8000], src[:8000])
        assert not io.read_slot(b, dst, os.urandom(16), 8000, csum_b)     # wrong key: a miss
    finally:
        io.close()
        ssd.close()


@pytest.mark.parametrize("chunk_blocks", [65536, 1])
def test_background_compaction_while_writing_then_recovery(tmp_path, shm_dir, monkeypatch,
                                                           chunk_blocks):
    """The real store + SSD tier in one event loop: the journal compacts in the background while
    puts and deletes go on, and a fresh store recovers exactly the live blocks. With one block
    entry per loop turn, puts and deletes land while the compaction builds its snapshot."""
    import asyncio

    from kvstore.tiers.ssd import compaction as ssd_journaling
    from kvstore.core.arena import Arena
    from kvstore.store.table import NO_SLOT, BlockTable
    from kvstore.core.layout import KVLayout
    from kvstore.store.blockstore import BlockStore, TierSet
    from kvstore.tiers.dram import DRAMTier
    from kvstore.tiers.ssd.catalog import SSDCatalog
    from kvstore.tiers.ssd.space import SSDSpace
    from kvstore.tiers.ssd.tier import SSDTier
    from kvstore.tiers.ssd.journal import Journal

    monkeypatch.setattr(ssd_journaling, "COMPACT_MIN_RECORDS", 8)
    monkeypatch.setattr(ssd_journaling, "COMPACT_CHUNK_BLOCKS", chunk_blocks)
    layout = KVLayout(1, 1, 64, 16, "uint8")          # 2 KiB blocks in 4 KiB slots
    bb = layout.block_bytes

    def open_tier():
        arena = Arena.create(8 << 20, shm_dir)
        copies = TierSet()                             # wired as the daemon's server.py does
        table = BlockTable(on_free=copies.forget)
        dram = DRAMTier(arena, table, 1 << 20)
        ssd = SlabFiles(tmp_path / "ssd", 4 << 20, 4 << 20, io_threads=2)
        ssd.open()
        catalog = SSDCatalog(table, ssd, Journal(ssd.directory / "journal", ssd.pool))
        t = SSDTier(table, dram, ssd, catalog, SSDSpace(table, ssd, catalog))
        copies.add(dram)
        copies.add(t)
        store = BlockStore(table, dram, ssd=t)
        t.recover(store.register_namespace)
        return arena, store, t

    async def run() -> dict[bytes, bytes]:
        arena, store, t = open_tier()
        s = store.open_session()
        ns = store.register_namespace("m", layout)
        kept: dict[bytes, bytes] = {}
        for i in range(60):
            key = i.to_bytes(16, "little")
            data = os.urandom(bb)
            aid, offs = store.allocate(s.session_id, ns.namespace_id, key)
            arena.buffer[offs[0]:offs[0] + bb] = data
            done: list[int] = []
            store.commit(s.session_id, aid, committed_out=done)
            await t.persist(done)                      # one PUTS frame per put
            kept[key] = data
            if i % 3:                                  # delete two of every three: DEL records
                store.delete(ns.namespace_id, key)
                await t.sync_journal()
                del kept[key]
        await t.journal.idle()
        assert t.journal.records_in_file < 60          # compacted at least once
        await t.close()
        arena.close()
        return kept

    kept = asyncio.run(run())
    arena, store, t = open_tier()
    try:
        ns = store.register_namespace("m", layout)
        assert t.slabs.counters.recovered_blocks == len(kept) == 20
        for key, data in kept.items():
            bid = store.table.find(ns.index, key)
            assert bid >= 0 and store.table.ssd[bid] != NO_SLOT
            buf = mmap.mmap(-1, layout.slot_bytes)
            assert t.slabs.read_slot(int(store.table.ssd[bid]), memoryview(buf), key, bb,
                                   int(store.table.csum[bid]))
            assert buf[:bb] == data
    finally:
        asyncio.run(t.close())
        arena.close()


def test_order_restore_keeps_the_newest_entry_per_key_parents_first():
    """The load's plan (SSDCatalog.order_restore, run off the event loop): per (namespace, key)
    the entry with the highest sequence number, even when it is invalid (it shadows older ones);
    only slots of the namespace's block size; sorted by (namespace, depth)."""
    from kvstore.tiers.ssd import journal as jr
    from kvstore.tiers.ssd.catalog import SSDCatalog

    rng = np.random.default_rng(5)
    n = 5000
    e = np.zeros(n, dtype=jr.PUT_DTYPE)
    e["ns"] = rng.integers(0, 3, n)                   # namespace 2 was refused (slot bytes 0)
    e["key"][:, 0] = rng.integers(0, 300, n)          # many first words shared
    e["key"][:, 1] = rng.integers(0, 4, n)
    e["depth"] = rng.integers(0, 20, n)
    e["seq"] = rng.permutation(n) + 1
    e["addr"] = (rng.integers(0, 3, n) << 32) | rng.integers(0, 120, n)   # segment 2: 8 KiB
    valid = (np.array([4096, 4096, 0, 0]), np.array([4096, 4096, 8192, 0]),
             np.array([100, 100, 50, 0]))
    newest: dict = {}
    for r in e:
        k = (int(r["ns"]), int(r["key"][0]), int(r["key"][1]))
        if k not in newest or r["seq"] > newest[k]["seq"]:
            newest[k] = r

    def ok(r) -> bool:
        seg, slot = int(r["addr"]) >> 32, int(r["addr"]) & 0xFFFFFFFF
        return r["ns"] < 2 and seg < 2 and slot < 100

    want = sorted((k, int(r["seq"])) for k, r in newest.items() if ok(r))
    plan = SSDCatalog.order_restore(e, valid)
    got = sorted(((int(r["ns"]), int(r["key"][0]), int(r["key"][1])), int(r["seq"]))
                 for r in plan)
    assert got == want
    order = list(zip(plan["ns"].tolist(), plan["depth"].tolist()))
    assert order == sorted(order)


def test_delete_while_the_load_compacts_stays_deleted(tmp_path, shm_dir):
    """The real store + SSD tier in one event loop: a block deleted while the background load
    builds its compaction snapshot (after its chunk was taken) is journaled as deleted once the
    delete answered, so after a crash a fresh store recovers every block but that one."""
    import asyncio

    from kvstore.core.arena import Arena
    from kvstore.core.layout import KVLayout
    from kvstore.store.blockstore import BlockStore, TierSet
    from kvstore.store.table import BlockTable
    from kvstore.tiers.dram import DRAMTier
    from kvstore.tiers.ssd.catalog import SSDCatalog
    from kvstore.tiers.ssd.journal import Journal
    from kvstore.tiers.ssd.space import SSDSpace
    from kvstore.tiers.ssd.tier import SSDTier

    layout = KVLayout(1, 1, 64, 16, "uint8")          # 2 KiB blocks in 4 KiB slots
    bb = layout.block_bytes
    keys = [i.to_bytes(16, "little") for i in range(1, 121)]

    def open_tier():
        arena = Arena.create(8 << 20, shm_dir)
        copies = TierSet()
        table = BlockTable(on_free=copies.forget)
        dram = DRAMTier(arena, table, 1 << 20)
        ssd = SlabFiles(tmp_path / "ssd", 4 << 20, 4 << 20, io_threads=2)
        ssd.open()
        catalog = SSDCatalog(table, ssd, Journal(ssd.directory / "journal", ssd.pool))
        t = SSDTier(table, dram, ssd, catalog, SSDSpace(table, ssd, catalog))
        copies.add(dram)
        copies.add(t)
        return arena, BlockStore(table, dram, ssd=t), t, catalog

    async def fill() -> None:
        arena, store, t, _ = open_tier()
        t.recover(store.register_namespace)
        s = store.open_session()
        ns = store.register_namespace("m", layout)
        for key in keys:
            aid, offs = store.allocate(s.session_id, ns.namespace_id, key)
            arena.buffer[offs[0]:offs[0] + bb] = key * (bb // 16)
            done: list[int] = []
            store.commit(s.session_id, aid, committed_out=done)
            await t.persist(done)
        await t.close()
        arena.close()

    async def load_and_delete() -> int:
        arena, store, t, catalog = open_tier()
        task = t.start_recovery(store.register_namespace, batch_blocks=4)
        while not (catalog.loading and catalog.compacting()):   # the snapshot is being built
            assert not task.done(), "the load ended before its compaction was seen"
            await asyncio.sleep(0)
        for _ in range(6):
            await asyncio.sleep(0)              # a few chunks later: keys[0]'s chunk is taken
        ns = store.namespaces[next(iter(store.namespaces))]
        n = store.delete(ns.namespace_id, keys[0])
        await t.sync_journal()                  # answers once durable, as the Delete RPC
        await task
        t.abandon()            # then a crash: no shutdown compaction rewrites the journal
        arena.close()
        return n

    asyncio.run(fill())
    assert asyncio.run(load_and_delete()) == 1
    arena, store, t, _ = open_tier()
    try:
        assert t.recover(store.register_namespace) == len(keys) - 1
        ns = store.register_namespace("m", layout)
        assert store.table.find(ns.index, keys[0]) < 0
        assert all(store.table.find(ns.index, k) >= 0 for k in keys[1:])
    finally:
        asyncio.run(t.close())
        arena.close()


def _syscalls(monkeypatch, name):
    """Count calls of os.<name> made by the slab files (the real call still runs)."""
    import kvstore.tiers.ssd.slotio as files_mod
    calls = []
    real = getattr(os, name)

    def counted(fd, buffers, offset):
        calls.append(len(buffers))
        return real(fd, buffers, offset)
    monkeypatch.setattr(files_mod.os, name, counted)
    return calls


def test_adjacent_slots_move_in_one_vectored_call_each_way(tmp_path, monkeypatch):
    """A group of slots adjacent in one file is written with one pwritev and read back with
    one preadv straight into the destinations (headers between them into a scratch page); the
    bytes, checksums, headers and counters are those of slot-by-slot I/O."""
    slot = 8192
    ssd = SlabFiles(tmp_path, 1 << 20, 1 << 20, io_threads=2)
    ssd.open()
    try:
        ssd.take_segment(slot)
        addrs = [ssd.allocate(slot) for _ in range(6)]
        assert addrs == list(range(addrs[0], addrs[0] + 6))     # lowest slots first
        src = mmap.mmap(-1, 6 * slot)
        src[:] = os.urandom(6 * slot)
        keys = [os.urandom(16) for _ in addrs]
        views = [memoryview(src)[i * slot:(i + 1) * slot] for i in range(6)]
        writes = [(a, v, k, 8000, b"t%d" % i) for i, (a, v, k) in enumerate(zip(addrs, views, keys))]
        pw = _syscalls(monkeypatch, "pwritev")
        order = [3, 0, 5, 1, 4, 2]                   # any order: results follow the items
        csums = ssd.write_slots([writes[i] for i in order])
        assert pw == [12]                            # one call: 6 headers + 6 payloads
        assert all(isinstance(c, int) for c in csums)
        by_addr = {writes[i][0]: c for i, c in zip(order, csums)}
        dst = mmap.mmap(-1, 6 * slot)
        dviews = [memoryview(dst)[i * slot:(i + 1) * slot] for i in range(6)]
        pr = _syscalls(monkeypatch, "preadv")
        reads = [(a, dviews[i], keys[i], 8000, by_addr[a]) for i, a in enumerate(addrs)]
        reads[4] = (addrs[4], dviews[4], keys[4], 8000, by_addr[addrs[4]] ^ 1)   # wrong csum
        assert ssd.read_slots(reads[::-1]) == [True, False, True, True, True, True]
        assert pr == [11]                            # one call: 6 payloads + 5 headers between
        for i in range(6):
            assert dst[i * slot:i * slot + 8000] == src[i * slot:i * slot + 8000]
            assert ssd.read_slot(addrs[i], dviews[i], keys[i], 8000, by_addr[addrs[i]])
        assert (ssd.counters.writes, ssd.counters.bytes_written) == (6, 6 * slot)
        assert ssd.counters.reads == 12 and ssd.counters.bytes_read == 12 * slot
        # slots that are not adjacent are separate calls, each result still its own
        pr.clear()
        gap = [reads[0], reads[2], reads[3]]
        assert ssd.read_slots(gap) == [True, True, True] and pr == [1, 3]
        del views, dviews, writes, reads, gap
    finally:
        ssd.close()
    again = SlabFiles(tmp_path, 1 << 20)
    again.open()
    try:
        found, _ = again.scan()                       # every header of the run verifies
        assert [(s.addr, s.key, s.tag) for s in found] == \
            [(a, keys[i], b"t%d" % i) for i, a in enumerate(addrs)]
    finally:
        again.close()


def test_a_failed_run_is_retried_slot_by_slot(tmp_path, monkeypatch):
    """A vectored read that comes back short or raises is read again one slot at a time, so one
    bad slot never fails its neighbours."""
    import kvstore.tiers.ssd.slotio as files_mod
    slot = 8192
    ssd = SlabFiles(tmp_path, 1 << 20, 1 << 20, io_threads=2)
    ssd.open()
    try:
        ssd.take_segment(slot)
        addrs = [ssd.allocate(slot) for _ in range(3)]
        src = mmap.mmap(-1, 3 * slot)
        src[:] = os.urandom(3 * slot)
        key = os.urandom(16)
        sv = [memoryview(src)[i * slot:(i + 1) * slot] for i in range(3)]
        csums = ssd.write_slots([(a, v, key, slot) for a, v in zip(addrs, sv)])
        real = os.preadv

        def flaky(fd, buffers, offset):
            if len(buffers) > 1:
                raise OSError(5, "injected EIO on the vectored read")
            return real(fd, buffers, offset)
        monkeypatch.setattr(files_mod.os, "preadv", flaky)
        dst = mmap.mmap(-1, 3 * slot)
        dv = [memoryview(dst)[i * slot:(i + 1) * slot] for i in range(3)]
        assert ssd.read_slots([(a, v, key, slot, c) for a, v, c in zip(addrs, dv, csums)]) == \
            [True, True, True]
        assert dst[:] == src[:]
        del sv, dv
    finally:
        ssd.close()


def test_block_checksum_is_xxh3_seeded_with_the_key_on_every_path():
    """The GIL-releasing path (system libxxhash, for large writable buffers) and python-xxhash
    give the same value, so blocks written by either verify through the other."""
    import xxhash

    from kvstore.tiers.ssd import format as fmt
    key = os.urandom(16)
    seed = int.from_bytes(key[:8], "little")
    buf = mmap.mmap(-1, 1 << 20)
    buf[:] = os.urandom(1 << 20)
    mv = memoryview(buf)
    for n in (1, 4096, fmt._RELEASE_GIL_BYTES, (1 << 20) - 7):
        want = xxhash.xxh3_64_intdigest(bytes(mv[:n]), seed=seed)
        assert fmt.block_checksum(mv[:n], key) == want
        assert fmt.block_checksum(bytes(mv[:n]), key) == want
    mv.release()
    buf.close()       # no buffer export left behind by the ctypes path
    import ctypes.util
    if ctypes.util.find_library("xxhash"):       # where the library is installed, it is used
        assert fmt.checksum_releases_gil()


def test_journal_group_commit_does_not_queue_behind_slab_io(tmp_path, monkeypatch):
    """A commit's fsync runs on the journal's own thread: with every slab I/O thread busy (a
    slow disk, many reads in flight) a sync still completes, and concurrent syncs share
    flushes (group commit)."""
    import asyncio
    import threading

    pool = ThreadPoolExecutor(2)                      # the slab files' I/O pool
    j = jr.Journal(tmp_path / "journal", pool)
    j.rewrite([jr.encode_ns(_ns())])
    release = threading.Event()
    busy = [pool.submit(release.wait, 30) for _ in range(4)]    # every I/O thread taken
    fsyncs = []
    real = os.fsync

    def counted(fd):
        fsyncs.append(fd)
        real(fd)
    monkeypatch.setattr(jr.os, "fsync", counted)        # the OS boundary: counted, still done

    async def commits():
        for i in range(8):                            # 8 commits, awaited together
            j.append(jr.encode_puts(_puts([i])))
        await asyncio.wait_for(asyncio.gather(*(j.sync() for _ in range(8))), 10)

    try:
        asyncio.run(commits())
    finally:
        release.set()
        for f in busy:
            f.result()
    assert j.pending() == 0 and len(fsyncs) == 1      # one flush for the eight commits
    j.close()
    st_ = jr.Journal(tmp_path / "journal", pool).replay()
    assert sorted(st_.puts["addr"].tolist()) == list(range(8))
    pool.shutdown()


def test_all_done_wakes_once_keeps_order_raises_and_cancels_the_unstarted():
    """The SSD tier's wait for its grouped pool tasks (kvstore.tiers.ssd.tier._all_done):
    results in submission order whatever order they end in; a task's exception reaches the
    caller; a cancelled wait cancels the tasks not started yet."""
    import asyncio
    import threading
    import time

    from kvstore.tiers.ssd.tier import _all_done

    def slow(i: int) -> int:
        time.sleep(0.02 * (3 - i))      # the last submitted ends first
        return i * 10

    def boom() -> int:
        raise OSError(5, "disk")

    async def go():
        with ThreadPoolExecutor(3) as pool:
            assert await _all_done([pool.submit(slow, i) for i in range(3)]) == [0, 10, 20]
            assert await _all_done([]) == []
            with pytest.raises(OSError):
                await _all_done([pool.submit(slow, 2), pool.submit(boom)])
        gate = threading.Event()
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(gate.wait, 5)
            queued = pool.submit(slow, 2)
            wait = asyncio.ensure_future(_all_done([first, queued]))
            await asyncio.sleep(0.05)
            wait.cancel()
            with pytest.raises(asyncio.CancelledError):
                await wait
            assert queued.cancelled()
            gate.set()
    asyncio.run(go())
