"""The HBM tier through real daemon and client processes.

On CPU hosts the tier runs with ``--hbm-device host``: the same protocol and bookkeeping (fill
slots under leases, copies in HBM never the only copy, eviction, GPUDirect-style SSD reads into
the pool) over a shared-memory pool. The CUDA IPC backend is exercised by the ``gpu`` tests.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from kvstore.client import KVClient
from kvstore.core.layout import KVLayout
from kvstore.v1 import kvstore_pb2 as pb

# 2 layers x 4 heads x 64 dims x 16 tokens x uint8 x (k, v) = 16 KiB per block
LAYOUT = KVLayout(num_layers=2, num_kv_heads=4, head_dim=64, block_tokens=16, dtype="uint8")
BB = LAYOUT.block_bytes
SMALL_DRAM = ("--dram-bytes", "4MiB", "--chunk-bytes", "256KiB")   # 256 blocks
HOST_HBM = ("--hbm-bytes", "1MiB", "--hbm-device", "host")         # 64 blocks


def chain(seed: int, n_blocks: int):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 50000, n_blocks * LAYOUT.block_tokens)
    data = rng.integers(0, 256, (n_blocks, *LAYOUT.block_shape), dtype=np.uint8)
    return tokens, torch.from_numpy(data)


def put_chain(ns, seed: int, n_blocks: int):
    tokens, data = chain(seed, n_blocks)
    keys = ns.block_keys(tokens)
    ns.put(keys, data).result(timeout=30)
    return keys, data


def fill_dram(ns, seed0: int) -> None:
    """Put 300 newer blocks: more than the 256-block DRAM tier, so older blocks leave DRAM."""
    for seed in range(25):
        put_chain(ns, seed0 + seed, 12)


def tier(c: KVClient, name: str) -> pb.TierStats:
    for t in c.stats().tiers:
        if pb.Tier.Name(t.tier) == f"TIER_{name}":
            return t
    raise AssertionError(f"no {name} tier in stats")


def wait_for(pred, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def get_into(ns, keys, n: int):
    out = torch.empty((n, *LAYOUT.block_shape), dtype=torch.uint8)
    return ns.get(keys, out=out).result(timeout=30)


def test_a_dram_hit_fills_hbm_and_the_next_get_reads_hbm(daemon_factory):
    d = daemon_factory(*SMALL_DRAM, *HOST_HBM)
    with KVClient(d.socket) as c:
        assert c.datapath.pool is not None and c.datapath.pool.backend == "host"
        ns = c.namespace("m", LAYOUT)
        keys, data = put_chain(ns, 1, 8)
        assert ns.lookup(keys).tiers == ["DRAM"] * 8

        got = get_into(ns, keys, 8)                   # DRAM hit; the client fills HBM
        assert torch.equal(got, data)
        wait_for(lambda: tier(c, "HBM").promotions == 8)
        h = tier(c, "HBM")
        assert (h.blocks, h.hits, h.bytes_in, h.used_bytes) == (8, 0, 8 * BB, 8 * BB)
        assert ns.lookup(keys).tiers == ["HBM"] * 8

        got = get_into(ns, keys, 8)                   # now served from HBM
        assert torch.equal(got, data)
        h = tier(c, "HBM")
        assert (h.hits, h.promotions, h.bytes_out) == (8, 8, 8 * BB)

        # A numpy output is not on the pool's device: read through DRAM, same bytes.
        dram_hits = tier(c, "DRAM").hits
        arr = ns.get(keys).result(timeout=30)
        assert np.array_equal(np.asarray(arr), data.numpy())
        assert tier(c, "DRAM").hits == dram_hits + 8 and tier(c, "HBM").hits == 8

        # The bytes in the pool are the block's bytes (what the next D2D hit copies).
        pool = c.datapath.pool.tensor
        lease_resp = c.call("Acquire", pb.AcquireRequest(
            session_id=c.session_id, namespace_id=ns.namespace_id,
            keys=b"".join(keys), want_hbm=True))
        offs = list(lease_resp.hbm_offsets)
        assert len(offs) == 8 and min(offs) > 0 and not any(f >= 0 for f in lease_resp.hbm_fill)
        for i, o in enumerate(offs):
            assert torch.equal(pool[o:o + BB], data[i].reshape(-1))
        c.call("Release", pb.ReleaseRequest(session_id=c.session_id,
                                            lease_id=lease_resp.lease_id))


def test_with_an_hbm_tier_same_host_lookups_and_reads_skip_the_rpc(daemon_factory):
    """An HBM tier keeps the index snapshot: lookups answer tier HBM for blocks with an HBM
    copy (as the daemon's Lookup does), and a client reading host memory still reads their
    DRAM copies lease-free. An SDK that knows only the first snapshot version refuses the file
    (and asks over gRPC) rather than misread tier HBM."""
    from kvstore.core import shmindex
    from kvstore.core.shmfile import COMPANION_HEADER, attach_companion

    d = daemon_factory(*SMALL_DRAM, *HOST_HBM)
    with KVClient(d.socket) as c, KVClient(d.socket, use_hbm=False) as plain:
        assert plain.local_index() is not None
        ns, pns = c.namespace("m", LAYOUT), plain.namespace("m", LAYOUT)
        keys, data = put_chain(ns, 7, 8)
        assert pns.lookup(keys).tiers == ["DRAM"] * 8 and pns.local_lookups_answered == 1
        assert torch.equal(get_into(ns, keys, 8), data)     # DRAM hit: the client fills HBM
        wait_for(lambda: tier(c, "HBM").blocks == 8)
        assert pns.lookup(keys).tiers == ["HBM"] * 8 and pns.local_lookups_answered == 2
        pns.local_lookups = False
        assert pns.lookup(keys).tiers == ["HBM"] * 8              # the daemon agrees
        pns.local_lookups = True
        # Lease-free reads of the DRAM copies, byte-exact, no Acquire on their path.
        before = tier(plain, "DRAM").hits
        got = pns.get(keys).result(timeout=30)
        assert np.array_equal(np.asarray(got), data.numpy()) and pns.local_gets_answered == 1
        assert tier(c, "HBM").hits == 0
        # The snapshot's file is version 2; a reader of version 1 only refuses it.
        path = plain.local_index().path
        magic, uuid, _ = COMPANION_HEADER.unpack(path.read_bytes()[:COMPANION_HEADER.size])
        assert magic == b"KVSIDX02"
        with pytest.raises(shmindex.ShmIndexError, match="another arena"):
            attach_companion(path, shmindex.ShmIndexError, "index snapshot", b"KVSIDX01",
                             uuid, 4096, lambda n: 0)
        shmindex.ShmIndex.attach(path, uuid).close()      # this SDK maps it
        # A delete leaves the snapshot: the lookup misses locally, the HBM copies are gone.
        assert ns.delete(keys) == 8
        assert pns.lookup(keys).num_cached == 0 and pns.local_lookups_answered == 3
        assert tier(c, "HBM").blocks == 0
        assert tier(plain, "DRAM").hits >= before


def test_hbm_eviction_keeps_every_block_readable(daemon_factory):
    d = daemon_factory(*SMALL_DRAM, *HOST_HBM)
    with KVClient(d.socket) as c:
        ns = c.namespace("m", LAYOUT)
        chains = []
        for seed in range(10):                         # 120 blocks: twice the HBM pool
            tokens, data = chain(100 + seed, 12)
            keys = ns.block_keys(tokens)
            ns.put(keys, data).result(timeout=30)
            chains.append((keys, data))
        for _ in range(2):
            for keys, data in chains:
                assert torch.equal(get_into(ns, keys, 12), data)
        wait_for(lambda: tier(c, "HBM").promotions >= 64)
        h = tier(c, "HBM")
        assert h.evictions > 0 and h.blocks <= 64 and h.used_bytes <= 64 * BB
        assert tier(c, "DRAM").blocks == 120            # an HBM eviction drops only the copy
        for keys, data in chains:                       # every block still byte-exact
            assert torch.equal(get_into(ns, keys, 12), data)


def test_a_block_gone_from_dram_is_gone_from_hbm(daemon_factory):
    """Without an SSD tier a DRAM eviction drops the block: its HBM copy must go with it
    (HBM never holds the only copy, and never serves a block the store forgot)."""
    d = daemon_factory(*SMALL_DRAM, *HOST_HBM)
    with KVClient(d.socket) as c:
        ns = c.namespace("m", LAYOUT)
        keys, data = put_chain(ns, 7, 4)
        get_into(ns, keys, 4)
        wait_for(lambda: tier(c, "HBM").blocks == 4)
        # Age those blocks, then fill DRAM (256 slots) with 300 newer blocks.
        fill_dram(ns, 1000)
        assert ns.lookup(keys).num_cached == 0
        assert tier(c, "HBM").blocks == 0
        assert len(get_into(ns, keys, 4)) == 0
        ns.delete(keys)


def test_delete_removes_the_hbm_copy(daemon_factory):
    d = daemon_factory(*SMALL_DRAM, *HOST_HBM)
    with KVClient(d.socket) as c:
        ns = c.namespace("m", LAYOUT)
        keys, data = put_chain(ns, 3, 6)
        get_into(ns, keys, 6)
        wait_for(lambda: tier(c, "HBM").blocks == 6)
        assert ns.delete(keys) == 6
        h = tier(c, "HBM")
        assert (h.blocks, h.used_bytes) == (0, 0)
        assert len(get_into(ns, keys, 6)) == 0


_HOLDER = textwrap.dedent("""
    import sys, time
    from kvstore.client import KVClient
    from kvstore.core.layout import KVLayout
    from kvstore.v1 import kvstore_pb2 as pb
    layout = KVLayout(num_layers=2, num_kv_heads=4, head_dim=64, block_tokens=16, dtype="uint8")
    c = KVClient(sys.argv[1])
    ns = c.namespace("m", layout)
    keys = bytes.fromhex(sys.argv[2])
    r = c.call("Acquire", pb.AcquireRequest(session_id=c.session_id,
               namespace_id=ns.namespace_id, keys=keys, want_hbm=True))
    print(sum(1 for f in r.hbm_fill if f >= 0), flush=True)
    time.sleep(600)
""")


def test_a_client_killed_mid_fill_leaves_nothing_behind(daemon_factory):
    d = daemon_factory(*SMALL_DRAM, *HOST_HBM)
    with KVClient(d.socket) as c:
        ns = c.namespace("m", LAYOUT)
        keys, data = put_chain(ns, 5, 8)
        holder = subprocess.Popen([sys.executable, "-c", _HOLDER, d.socket, b"".join(keys).hex()],
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "8"      # 8 fill slots handed out
            h = tier(c, "HBM")
            assert (h.used_bytes, h.blocks) == (8 * BB, 0)      # reserved, not yet visible
            assert ns.lookup(keys).tiers == ["DRAM"] * 8
            # Another reader meanwhile gets DRAM and no second fill of the same blocks.
            assert torch.equal(get_into(ns, keys, 8), data)
            assert tier(c, "HBM").used_bytes == 8 * BB
        finally:
            holder.kill()
            holder.wait()
        wait_for(lambda: tier(c, "HBM").used_bytes == 0)        # session reclaimed the fills
        assert tier(c, "HBM").blocks == 0
        assert torch.equal(get_into(ns, keys, 8), data)          # and fills work again
        wait_for(lambda: tier(c, "HBM").blocks == 8)


def test_an_expired_fill_is_quarantined_until_the_session_ends(daemon_factory):
    d = daemon_factory(*SMALL_DRAM, *HOST_HBM, "--lease-timeout-s", "0.5")
    with KVClient(d.socket) as c:
        ns = c.namespace("m", LAYOUT)
        keys, data = put_chain(ns, 6, 4)
        sid = c.session_id
        r = c.call("Acquire", pb.AcquireRequest(session_id=sid, namespace_id=ns.namespace_id,
                                                keys=b"".join(keys), want_hbm=True))
        assert sum(1 for f in r.hbm_fill if f >= 0) == 4
        time.sleep(1.5)                                   # the lease expires unreleased
        wait_for(lambda: tier(c, "HBM").used_bytes == 4 * BB and c.stats().leases_expired >= 1)
        with pytest.raises(Exception, match="expired"):
            c.call("Release", pb.ReleaseRequest(session_id=sid, lease_id=r.lease_id,
                                                hbm_filled=True))
        assert tier(c, "HBM").blocks == 0                # a late "filled" publishes nothing
    # The first session ended and this process unmapped the pool: the slots come back. (Read
    # from another process: a client of this one would map the pool again, and a process that
    # maps it may still write the slots, kvstore/store/writers.py.)
    wait_for(lambda: _cli_hbm_used(d.socket) == 0, 15)


def _cli_hbm_used(sock: str) -> int:
    import json
    r = subprocess.run([sys.executable, "-m", "kvstore", "stats", "--socket", sock, "--json"],
                       capture_output=True, text=True, timeout=60, check=True)
    return next(t["used_bytes"] for t in json.loads(r.stdout)["tiers"] if t["tier"] == "HBM")


def test_ssd_blocks_are_read_straight_into_hbm(daemon_factory, tmp_path):
    ssd = ("--ssd-dir", str(tmp_path / "ssd"), "--ssd-bytes", "32MiB",
           "--ssd-segment-bytes", "8MiB", "--ssd-io-threads", "4")
    d = daemon_factory(*SMALL_DRAM, *HOST_HBM, *ssd)
    assert "SSD blocks are read straight into HBM" in d.log()
    with KVClient(d.socket) as c:
        ns = c.namespace("m", LAYOUT)
        keys, data = put_chain(ns, 9, 8)
        fill_dram(ns, 2000)  # push the chain out of DRAM to SSD
        assert ns.lookup(keys).tiers == ["SSD"] * 8
        dram_promotions = tier(c, "DRAM").promotions
        assert torch.equal(get_into(ns, keys, 8), data)   # SSD -> HBM slots -> out
        h = tier(c, "HBM")
        assert (h.promotions, h.blocks, h.bytes_in) == (8, 8, 8 * BB)
        assert tier(c, "DRAM").promotions == dram_promotions     # no DRAM bounce
        assert tier(c, "SSD").promotions >= 8
        assert ns.lookup(keys).tiers == ["HBM"] * 8
        assert torch.equal(get_into(ns, keys, 8), data)   # an HBM hit now
        assert tier(c, "HBM").hits == 8
        # A reader that cannot use HBM still gets the blocks (promoted SSD -> DRAM).
        arr = ns.get(keys).result(timeout=30)
        assert np.array_equal(np.asarray(arr), data.numpy())
        assert tier(c, "DRAM").promotions == dram_promotions + 8


def test_remote_clients_never_see_the_pool(daemon_factory):
    d = daemon_factory(*SMALL_DRAM, *HOST_HBM)
    with KVClient(d.socket, shared_memory=False) as c:
        assert c.datapath.pool is None
        ns = c.namespace("m", LAYOUT)
        keys, data = put_chain(ns, 11, 4)
        for _ in range(2):
            assert torch.equal(get_into(ns, keys, 4), data)
        assert tier(c, "HBM").promotions == 0
    with KVClient(d.socket, use_hbm=False) as c:
        assert c.datapath.pool is None


def test_hbm_tier_without_cuda_is_a_clear_startup_error(tmp_path, shm_dir):
    if torch.cuda.is_available():
        pytest.skip("checks the behaviour without CUDA")
    r = subprocess.run([sys.executable, "-m", "kvstore", "serve", "--socket",
                        str(tmp_path / "s.sock"), "--shm-dir", str(shm_dir), *SMALL_DRAM,
                        "--hbm-bytes", "64MiB"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "HBM tier" in r.stderr and "CUDA is not available" in r.stderr
    r = subprocess.run([sys.executable, "-m", "kvstore", "config", "--print",
                        "--hbm-device", "tpu"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "hbm_device" in r.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_pool_by_ipc_fill_then_device_to_device_hit(daemon_factory):
    d = daemon_factory(*SMALL_DRAM, "--hbm-bytes", "64MiB", "--hbm-device", "cuda:0")
    with KVClient(d.socket) as c:
        assert c.datapath.pool is not None and c.datapath.pool.backend == "cuda"
        ns = c.namespace("m", LAYOUT)
        tokens, data = chain(21, 8)
        keys = ns.block_keys(tokens)
        ns.put(keys, data.cuda()).result(timeout=30)
        for expect_hits in (0, 8):
            out = torch.empty((8, *LAYOUT.block_shape), dtype=torch.uint8, device="cuda")
            got = ns.get(keys, out=out).result(timeout=30)
            assert torch.equal(got.cpu(), data)
            wait_for(lambda: tier(c, "HBM").promotions == 8)
            assert tier(c, "HBM").hits == expect_hits


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_pool_ssd_blocks_reach_hbm(daemon_factory, tmp_path):
    """SSD-only blocks read by a GPU client land in HBM: straight from the slab file with
    kvikio (the gds extra), through DRAM without it. Same bytes either way."""
    from kvstore.tiers.ssd import gds
    ssd = ("--ssd-dir", str(tmp_path / "ssd"), "--ssd-bytes", "32MiB",
           "--ssd-segment-bytes", "8MiB", "--ssd-io-threads", "4")
    d = daemon_factory(*SMALL_DRAM, "--hbm-bytes", "64MiB", "--hbm-device", "cuda:0", *ssd)
    direct = gds.available()
    assert ("read straight into HBM" if direct else "reach HBM through DRAM") in d.log()
    with KVClient(d.socket) as c:
        ns = c.namespace("m", LAYOUT)
        keys, data = put_chain(ns, 22, 8)
        fill_dram(ns, 3000)
        assert ns.lookup(keys).tiers == ["SSD"] * 8
        out = torch.empty((8, *LAYOUT.block_shape), dtype=torch.uint8, device="cuda")
        assert torch.equal(ns.get(keys, out=out).result(timeout=30).cpu(), data)
        wait_for(lambda: tier(c, "HBM").blocks == 8)
        assert ns.lookup(keys).tiers == ["HBM"] * 8


def test_after_a_daemon_restart_the_client_opens_the_new_pool(daemon_factory):
    d = daemon_factory(*SMALL_DRAM, *HOST_HBM)
    with KVClient(d.socket) as c:
        ns = c.namespace("m", LAYOUT)
        keys, data = put_chain(ns, 31, 4)
        get_into(ns, keys, 4)
        wait_for(lambda: tier(c, "HBM").blocks == 4)
        old_pool = c.datapath.pool._keep.path              # the host pool's shared-memory file
        d.kill()                                   # the pool's file is the dead daemon's
        d.start()

        def back():
            try:
                return ns.put(keys, data).result(timeout=30) == 4
            except Exception:
                return False
        wait_for(back, timeout_s=20)
        assert c.reconnects >= 1 and c.datapath.pool is not None
        assert c.datapath.pool._keep.path != old_pool and c.datapath.pool._keep.path.exists()
        # the new daemon removed the killed one's pool file
        assert list(d.shm_dir.glob("kvstorehbm-*.arena")) == [c.datapath.pool._keep.path]
        assert torch.equal(get_into(ns, keys, 4), data)      # fill the new pool ...
        wait_for(lambda: tier(c, "HBM").blocks == 4)         # (published at the release)
        assert torch.equal(get_into(ns, keys, 4), data)      # ... then hit it
        assert tier(c, "HBM").hits == 4


def test_prefetch_stages_blocks_in_hbm_so_the_get_is_an_hbm_hit(daemon_factory, tmp_path):
    ssd = ("--ssd-dir", str(tmp_path / "ssd"), "--ssd-bytes", "32MiB",
           "--ssd-segment-bytes", "8MiB", "--ssd-io-threads", "4")
    d = daemon_factory(*SMALL_DRAM, *HOST_HBM, *ssd)
    with KVClient(d.socket) as c:
        ns = c.namespace("m", LAYOUT)
        t_ssd, d_ssd = chain(41, 6)                        # will be SSD-only
        k_ssd = ns.block_keys(t_ssd)
        ns.put(k_ssd, d_ssd).result(timeout=30)
        fill_dram(ns, 4000)
        t_dram, d_dram = chain(42, 6)                      # stays in DRAM
        k_dram = ns.block_keys(t_dram)
        ns.put(k_dram, d_dram).result(timeout=30)
        assert ns.lookup(k_ssd).tiers == ["SSD"] * 6 and ns.lookup(k_dram).tiers == ["DRAM"] * 6
        dram_promotions = tier(c, "DRAM").promotions

        tickets = ns.prefetch_many([(k_ssd, 5.0), (k_dram, 5.0)])   # to_hbm: the pool is open
        assert [(t.blocks, t.to_promote) for t in tickets] == [(6, 6), (6, 6)]
        wait_for(lambda: tier(c, "HBM").blocks == 12)
        assert ns.lookup(k_ssd).tiers == ["HBM"] * 6 and ns.lookup(k_dram).tiers == ["HBM"] * 6
        assert tier(c, "DRAM").promotions == dram_promotions      # SSD blocks skipped DRAM
        assert torch.equal(get_into(ns, k_ssd, 6), d_ssd)
        assert torch.equal(get_into(ns, k_dram, 6), d_dram)
        st = c.stats()
        assert tier(c, "HBM").hits == 12 and st.prefetch_on_time == 2
        assert st.prefetch_bytes_promoted == 12 * BB

        # to_hbm=False keeps the old behaviour: nothing new is staged in HBM
        t3, d3 = chain(43, 4)
        k3 = ns.block_keys(t3)
        ns.put(k3, d3).result(timeout=30)
        ns.prefetch(k3, 5.0, to_hbm=False)
        time.sleep(0.3)
        assert tier(c, "HBM").blocks == 12
