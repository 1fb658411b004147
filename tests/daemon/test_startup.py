"""Start-up: the daemon serves before its DRAM arena is prepared, hands out only prepared
chunks, and reaches full capacity in the background; `kvstore bench startup` measures it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from kvstore.core.arena import HEADER_BYTES, Arena, ArenaError, ArenaPreparer
from kvstore.client import KVClient, KVLayout
from kvstore.core.errors import ResourceExhausted
from kvstore.core.keys import chain_keys, pack_keys
from kvstore.store.blockstore import NO_ROOM, dram_store
from kvstore.tiers.dram import SlabAllocator
from kvstore.v1 import kvstore_pb2 as pb

MiB = 1 << 20
L = KVLayout(num_layers=1, num_kv_heads=1, head_dim=64, block_tokens=16, dtype="float32")  # 8 KiB


def _keys(seed: bytes, n: int) -> list[bytes]:
    return chain_keys(seed * 16, list(range(n * 16)), 16)


def _dram(stats):
    return next(t for t in stats.tiers if t.tier == pb.TIER_DRAM)


def _pattern(n: int, layout: KVLayout, seed: int) -> torch.Tensor:
    """Distinct bytes per block and position, cheap to make and to compare."""
    numel = int(np.prod(layout.block_shape))
    base = torch.arange(numel, dtype=torch.int32).remainder(251)
    rows = [(base + (seed * 7919 + i * 131)).remainder(251).to(torch.float32) for i in range(n)]
    return torch.stack(rows).view(n, *layout.block_shape).to(torch.float16)


# -- the allocator and the store, in process -------------------------------------------------

def test_allocator_hands_out_only_ready_chunks():
    arena_bytes = HEADER_BYTES + 8 * MiB
    slabs = SlabAllocator(arena_bytes, MiB, ready_bytes=HEADER_BYTES + MiB + 4096)
    assert slabs.capacity_bytes == 8 * MiB and slabs.ready_bytes == MiB   # partial chunk: no
    offs = [slabs.allocate(256 << 10) for _ in range(5)]
    assert offs[:4] == [HEADER_BYTES + i * (256 << 10) for i in range(4)] and offs[4] is None
    assert slabs.mark_ready(HEADER_BYTES + MiB) == 0           # nothing new
    assert slabs.mark_ready(HEADER_BYTES + 3 * MiB) == 2
    got = [slabs.allocate(256 << 10) for _ in range(9)]
    assert got[8] is None and max(got[:8]) + (256 << 10) <= HEADER_BYTES + 3 * MiB
    # A slot of three chunks needs three adjacent ready chunks.
    assert slabs.allocate(3 * MiB) is None
    slabs.mark_ready(arena_bytes)
    assert slabs.ready_bytes == slabs.capacity_bytes
    assert slabs.allocate(3 * MiB) == HEADER_BYTES + 3 * MiB


def test_store_never_places_a_block_in_unprepared_memory(shm_dir):
    arena = Arena.create(8 * MiB, shm_dir, prepare_later=True)
    try:
        assert arena.reserved_bytes == HEADER_BYTES
        assert os.stat(arena.path).st_blocks * 512 < 2 * MiB        # not reserved up front
        store = dram_store(arena, chunk_bytes=MiB)
        ns = store.register_namespace("m", L)
        s = store.open_session("t", 1)
        with pytest.raises(ResourceExhausted):                    # nothing ready: refused
            store.allocate(s.session_id, ns.namespace_id, pack_keys(_keys(b"a", 1)))
        arena.reserve(HEADER_BYTES, MiB)
        store.dram.mark_ready(arena.reserved_bytes)
        keys = _keys(b"b", 200)                              # 128 slots are ready
        aid, offs = store.allocate(s.session_id, ns.namespace_id, pack_keys(keys))
        placed = [o for o in offs if o >= 0]
        assert len(placed) == 128 and offs[128:] == [NO_ROOM] * 72
        assert max(placed) + L.slot_bytes <= arena.reserved_bytes
        for i, o in enumerate(placed):
            arena.buffer[o:o + L.block_bytes] = bytes([i % 256]) * L.block_bytes
        store.commit(s.session_id, aid)
        with pytest.raises(ArenaError):                           # out of order: refused
            arena.reserve(HEADER_BYTES + 2 * MiB, MiB)
    finally:
        arena.close()
    assert not arena.path.exists()


def test_preparer_reserves_in_order_then_populates(shm_dir):
    arena = Arena.create(16 * MiB, shm_dir, prepare_later=True)
    seen: list[int] = []
    try:
        prep = ArenaPreparer(arena, 4 * MiB, seen.append).start()
        deadline = time.monotonic() + 30
        while not prep.done and time.monotonic() < deadline:
            time.sleep(0.01)
        assert prep.done and not prep.error
        assert seen == sorted(seen) and seen[-1] == arena.size_bytes
        assert arena.reserved_bytes == arena.size_bytes
        assert os.stat(arena.path).st_blocks * 512 >= arena.size_bytes
        if prep.populate_supported:
            assert arena.populated_bytes() == arena.size_bytes and prep.populated_s > 0
        # A client attaching now maps it whole and sees the daemon's bytes.
        arena.buffer[HEADER_BYTES:HEADER_BYTES + 5] = b"hello"
        other = Arena.attach(arena.path, arena.uuid, arena.size_bytes)
        assert bytes(other.view(HEADER_BYTES, 5)) == b"hello"
        other.close()
    finally:
        arena.close()


def test_preparer_stops_promptly_when_paced(shm_dir):
    arena = Arena.create(64 * MiB, shm_dir, prepare_later=True)
    try:
        prep = ArenaPreparer(arena, 4 * MiB, lambda end: None, limit_bps=8 * MiB).start()
        time.sleep(0.3)
        t0 = time.monotonic()
        prep.stop()
        assert time.monotonic() - t0 < 2.0
        assert HEADER_BYTES < arena.reserved_bytes < arena.size_bytes
    finally:
        arena.close()


# -- a real daemon and a real client ----------------------------------------------------------

def test_daemon_serves_while_preparing_and_reaches_full_capacity(daemon_factory):
    # 256 MiB paced at 40 MiB/s: ~6 s to reserve, so the daemon answers long before.
    d = daemon_factory("--dram-bytes", "256MiB", "--chunk-bytes", "8MiB",
                       "--dram-prepare-limit", "40MiB/s")
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, block_tokens=32,
                      dtype="float16")                             # 32 KiB blocks
    arena_path = None
    with KVClient(d.socket) as c:
        dram = _dram(c.stats())
        assert dram.capacity_bytes == 256 * MiB
        assert 0 < dram.ready_bytes < dram.capacity_bytes          # partial readiness shown
        assert c.shared_memory                                    # attached mid-preparation
        arena_path = next(d.shm_dir.glob("*.arena"))
        assert os.stat(arena_path).st_blocks * 512 < 200 * MiB    # really not reserved yet
        ns = c.namespace("m", layout)
        # Puts during preparation land in ready chunks and read back byte for byte.
        early_keys = ns.block_keys(list(range(32 * 256)))          # 256 blocks = 8 MiB
        early = _pattern(len(early_keys), layout, 1)
        assert ns.put(early_keys, early).result() == len(early_keys)
        st = _dram(c.stats())
        assert st.used_bytes <= st.ready_bytes < st.capacity_bytes
        assert torch.equal(ns.get(early_keys).result(), early)
        deadline = time.monotonic() + 60
        while _dram(c.stats()).ready_bytes < 256 * MiB and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _dram(c.stats()).ready_bytes == 256 * MiB
        assert os.stat(arena_path).st_blocks * 512 >= 256 * MiB
        # Full capacity is usable: 6000 more blocks (~188 MiB) fit beside the first ones.
        more_keys = ns.block_keys(list(range(10**6, 10**6 + 32 * 6000)))
        for i in range(0, len(more_keys), 1000):
            part = more_keys[i:i + 1000]
            assert ns.put(part, _pattern(len(part), layout, 2 + i)).result() == len(part)
        assert ns.lookup(early_keys).num_cached == len(early_keys)
        assert sum(ns.lookup(more_keys[i:i + 3000]).num_cached for i in (0, 3000)) == 6000
        for i in (0, 3000, 5000):
            part = more_keys[i:i + 1000]
            assert torch.equal(ns.get(part).result(), _pattern(len(part), layout, 2 + i))
        assert torch.equal(ns.get(early_keys).result(), early)
    assert "full capacity (256.0 MiB) reserved" in d.log()


def test_dram_bytes_not_a_whole_number_of_chunks_reserves_only_what_is_used(daemon_factory):
    # 10 MiB in 4 MiB chunks: the tier can use 2 chunks. It reserved all 10 MiB while holding
    # only 8; now it reserves 8, says so at start-up, and stats show the 8.
    d = daemon_factory("--dram-bytes", "10MiB", "--chunk-bytes", "4MiB")
    deadline = time.monotonic() + 30
    while "full capacity" not in d.log():
        assert time.monotonic() < deadline, d.log()
        time.sleep(0.05)
    log = d.log()
    assert "dram_bytes 10.0 MiB is not a whole number of 4.0 MiB chunks: the DRAM tier uses " \
        "and reserves 8.0 MiB (2 chunks)" in log, log
    assert "full capacity (8.0 MiB) reserved" in log, log
    (arena,) = d.shm_dir.glob("*.arena")
    assert arena.stat().st_size == HEADER_BYTES + (8 << 20)
    with KVClient(d.socket) as c:
        (dram,) = [t for t in c.stats().tiers if t.tier == pb.TIER_DRAM]
        assert dram.capacity_bytes == dram.ready_bytes == 8 << 20
        # All of it holds blocks: 16 blocks of 512 KiB fill it, and read back exact.
        layout = KVLayout(num_layers=1, num_kv_heads=8, head_dim=128, block_tokens=256,
                          dtype="uint8")
        ns = c.namespace("m", layout)
        keys = ns.block_keys(list(range(16 * 256)))
        data = torch.randint(0, 255, (16, *layout.block_shape), dtype=torch.uint8)
        for half in (slice(0, 8), slice(8, 16)):     # 4 MiB a call: under the in-flight cap
            assert ns.put(keys[half], data[half]).result() == 8
        for half in (slice(0, 8), slice(8, 16)):
            assert torch.equal(ns.get(keys[half]).result(), data[half])
    out = subprocess.run([sys.executable, "-m", "kvstore", "stats", "--socket", d.socket,
                          "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    (row,) = [t for t in json.loads(out.stdout)["tiers"] if t["tier"] == "DRAM"]
    assert row["capacity_bytes"] == 8 << 20


def test_daemon_refuses_an_arena_that_cannot_fit(daemon_factory, shm_dir):
    free = os.statvfs(shm_dir).f_bavail * os.statvfs(shm_dir).f_frsize
    with pytest.raises(RuntimeError) as exc:
        daemon_factory("--dram-bytes", str(free + (1 << 30)))
    assert "cannot reserve" in str(exc.value) and "enlarge /dev/shm" in str(exc.value)


# -- the benchmark ----------------------------------------------------------------------------

def _bench(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", "kvstore", "bench", "startup", *args],
                          check=False, capture_output=True, text=True, timeout=timeout)


def test_bench_startup_small_run(shm_dir):
    r = _bench("--json", "--sizes", "32MiB,64MiB", "--chunk-bytes", "8MiB", "--tiny-size", "16MiB",
               "--shm-dir", str(shm_dir))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert [row["size_bytes"] for row in res["sizes"]] == [32 * MiB, 64 * MiB]
    for row in res["sizes"]:
        assert row["capacity_bytes"] == row["size_bytes"]
        assert 0 < row["ready_s"] <= row["full_s"]
        assert row["fallocate_s"] > 0
        assert row["full_vs_fallocate"] == pytest.approx(row["full_s"] / row["fallocate_s"])
        assert row["reserve_s"] is not None and row["reserve_s"] >= 0
    assert res["max_ready_s"] == max(row["ready_s"] for row in res["sizes"])
    for row in res["sizes"]:
        assert row["tiny_ready_s"] > 0
        assert row["ready_vs_tiny"] == pytest.approx(row["ready_s"] / row["tiny_ready_s"])
    assert list(shm_dir.iterdir()) == []                          # cleaned up


def test_bench_startup_restart_case(shm_dir, tmp_path):
    """--ssd-blocks: a daemon restarted on a synthetic SSD index answers, serves DRAM, loads
    the index and then serves the sampled SSD blocks byte-exact; its directories are removed."""
    r = _bench("--json", "--sizes", "32MiB", "--chunk-bytes", "8MiB", "--tiny-size", "16MiB",
               "--shm-dir", str(shm_dir), "--no-populated", "--ssd-blocks", "20000",
               "--ssd-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    rs = res["restart"]
    assert rs["blocks"] == rs["recovered_blocks"] == 20000
    assert 0 < rs["ready_s"] <= rs["ssd_loaded_s"]
    assert res["restart_ready_s"] == rs["ready_s"]
    assert res["restart_ssd_loaded_s"] == rs["ssd_loaded_s"]
    assert rs["dram_ok"] is True
    assert rs["ssd_sample"] == rs["ssd_sample_exact"] == 64
    assert rs["ready_vs_tiny"] == pytest.approx(rs["ready_s"] / rs["tiny_ready_s"])
    assert list(shm_dir.iterdir()) == [] and list(tmp_path.iterdir()) == []


def test_bench_startup_skips_what_does_not_fit_and_refuses_bad_sizes(shm_dir):
    r = _bench("--sizes", "64TiB", "--shm-dir", str(shm_dir))
    assert r.returncode == 1 and "no size fits here" in r.stderr and "64.0 TiB" in r.stderr
    r = _bench("--sizes", "lots", "--shm-dir", str(shm_dir))
    assert r.returncode == 2 and "kvstore bench startup:" in r.stderr


def test_bench_scale_small_run():
    r = subprocess.run([sys.executable, "-m", "kvstore", "bench", "scale", "--json", "--sizes",
                        "1000,20000", "--batch", "16", "--rounds", "50"],
                       check=False, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert [row["indexed_blocks"] for row in res["sizes"]] == [1000, 20000]
    for row in res["sizes"]:
        for op in ("lookup", "get"):
            assert 0 < row[op]["p50_us"] <= row[op]["p99_us"]
    assert res["sizes"][0]["lookup"]["p50_vs_smallest"] == 1.0
    assert res["lookup_p50_growth"] == res["sizes"][-1]["lookup"]["p50_vs_smallest"]
    bad = subprocess.run([sys.executable, "-m", "kvstore", "bench", "scale", "--sizes", "ten"],
                         check=False, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "kvstore bench scale:" in bad.stderr
