"""The SSD tier through real daemon processes: tiering, recovery after SIGKILL, corruption,
write errors, format checks. Every block written is read back and compared byte for byte."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from kvstore.client import KVClient
from kvstore.core.layout import KVLayout
from support import SUPPORT
from support.ssd import (BB, LAYOUT, SMALL_DRAM, chain, expected_ssd_io, get_exact, payload_offset,
                         put_chain, ssd_args, ssd_stats, tier)


@pytest.mark.parametrize("policy", ["write_through", "write_back"])
def test_working_set_4x_dram_every_byte_checked(daemon_factory, tmp_path, policy):
    d = daemon_factory(*ssd_args(tmp_path / "ssd", "32MiB", "--ssd-write-policy", policy))
    with KVClient(d.socket) as c:
        ns = c.namespace("m", LAYOUT)
        chains = [put_chain(ns, seed, 16) for seed in range(64)]   # 1024 blocks = 4x DRAM
        for keys, data in chains:
            assert get_exact(ns, keys, data) == 16
        st = ssd_stats(c)
        ssd, dram = tier(st, "SSD"), tier(st, "DRAM")
        assert ssd.hits > 0 and ssd.promotions > 0 and dram.demotions > 0
        assert ssd.checksum_failures == 0 and ssd.io_errors == 0
        assert ssd.bytes_out >= ssd.promotions * BB
        assert ns.lookup(chains[0][0]).num_cached == 16
    if policy == "write_back":
        assert d.stop() == 0
        import re
        m = re.search(r"write-back: (\d+) blocks written ahead of eviction by the cleaner, "
                      r"(\d+) while an eviction waited", d.log())
        assert m and int(m.group(1)) > 0, d.log()[-2000:]


def test_lookup_reports_ssd_tier(daemon_factory, tmp_path):
    d = daemon_factory(*ssd_args(tmp_path / "ssd"))
    with KVClient(d.socket) as c:
        ns = c.namespace("m", LAYOUT)
        first = put_chain(ns, 0, 8)
        for seed in range(1, 40):          # push the first chain out of DRAM
            put_chain(ns, seed, 8)
        r = ns.lookup(first[0])
        assert r.num_cached == 8 and set(r.tiers) == {"SSD"}
        assert get_exact(ns, *first) == 8
        assert set(ns.lookup(first[0]).tiers) == {"DRAM"}
    out = subprocess.run([sys.executable, "-m", "kvstore", "stats", "--socket", d.socket],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and f"SSD ({expected_ssd_io()}): read" in out.stdout, out.stdout
    js = json.loads(subprocess.run([sys.executable, "-m", "kvstore", "stats", "--json",
                                    "--socket", d.socket], capture_output=True, text=True,
                                   timeout=60).stdout)
    ssd = next(t for t in js["tiers"] if t["tier"] == "SSD")
    assert ssd["hits"] == 8 and ssd["promotions"] == 8 and ssd["bytes_out"] >= 8 * BB


_WRITER = r"""
import sys, numpy as np
sys.path.insert(0, {tests!r})
from support.ssd import LAYOUT, put_chain
from kvstore.client import KVClient
c = KVClient({sock!r})
ns = c.namespace("m", LAYOUT)
seed = 0
while True:
    put_chain(ns, seed, 4)
    print(seed, flush=True)       # printed only after the commit returned
    seed += 1
"""


def test_sigkill_during_writes_then_restart_serves_every_committed_block(daemon_factory, tmp_path):
    ssd_dir = tmp_path / "ssd"
    d = daemon_factory(*ssd_args(ssd_dir, "64MiB"))
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER.format(tests=str(SUPPORT.parent), sock=d.socket)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    committed = []
    try:
        deadline = time.monotonic() + 30
        while len(committed) < 60 and time.monotonic() < deadline:
            line = writer.stdout.readline()
            if not line:
                break
            committed.append(int(line))
        d.kill()                          # SIGKILL mid-load
    finally:
        writer.kill()
        writer.wait()
    committed += [int(l) for l in writer.stdout.read().split()]
    assert len(committed) >= 20
    d2 = daemon_factory(*ssd_args(ssd_dir, "64MiB"), workdir=tmp_path / "after")
    with KVClient(d2.socket) as c:
        ns = c.namespace("m", LAYOUT)
        for seed in committed:
            tokens, data = chain(seed, 4)
            assert get_exact(ns, ns.block_keys(tokens), data) == 4, f"chain {seed} lost"
        ssd = tier(ssd_stats(c), "SSD")
        assert ssd.recovered_blocks >= 4 * len(committed)
        assert ssd.checksum_failures == 0


def test_flipped_byte_in_slot_file_is_a_miss_never_served(daemon_factory, tmp_path):
    ssd_dir = tmp_path / "ssd"
    d = daemon_factory(*ssd_args(ssd_dir))
    with KVClient(d.socket) as c:
        ns = c.namespace("m", LAYOUT)
        keys, data = put_chain(ns, 7, 3)   # slots 0, 1, 2 of the first segment
    assert d.stop() == 0
    seg = ssd_dir / "seg-00000.slab"
    at = payload_offset(1) + 1234
    with open(seg, "r+b") as f:            # flip one byte inside the second block
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0xFF]))
    d2 = daemon_factory(*ssd_args(ssd_dir), workdir=tmp_path / "after")
    with KVClient(d2.socket) as c:
        ns = c.namespace("m", LAYOUT)
        assert ns.lookup(keys).num_cached == 3   # not read yet: the index still lists it
        assert get_exact(ns, keys, data) == 1    # block 1 fails its checksum: prefix of 1
        ssd = tier(ssd_stats(c), "SSD")
        assert ssd.checksum_failures == 1
        assert ns.lookup(keys).num_cached == 1   # dropped, slot freed
        assert get_exact(ns, keys, data) == 1


def test_write_errors_keep_the_daemon_serving(daemon_factory, tmp_path):
    env = {"KVSTORE_TEST_SSD_WRITE_ERRNO": "28", "KVSTORE_TEST_SSD_WRITE_FAIL_AFTER": "4"}
    d = daemon_factory(*ssd_args(tmp_path / "ssd"), env=env)
    with KVClient(d.socket) as c:
        ns = c.namespace("m", LAYOUT)
        keys, data = put_chain(ns, 1, 10)
        assert get_exact(ns, keys, data) == 10    # still in DRAM
        ssd = tier(ssd_stats(c), "SSD")
        assert ssd.io_errors == 6 and ssd.blocks == 4
        # Filling DRAM now drops the blocks that have no SSD copy; the daemon keeps serving.
        for seed in range(2, 40):
            k, v = put_chain(ns, seed, 8)
        assert get_exact(ns, k, v) == 8
    assert "No space left on device" in d.log()
    assert d.proc.poll() is None


def test_incompatible_format_is_refused(tmp_path, shm_dir):
    ssd_dir = tmp_path / "ssd"
    ssd_dir.mkdir()
    (ssd_dir / "superblock").write_bytes(b"KVSTSSD\x00" + json.dumps(
        {"format_version": 99, "segment_bytes": 8 << 20}).encode())
    r = subprocess.run([sys.executable, "-m", "kvstore", "serve", "--socket",
                        str(tmp_path / "s.sock"), "--shm-dir", str(shm_dir),
                        *ssd_args(ssd_dir)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "format version 99" in r.stderr and "refusing" in r.stderr


def test_graceful_restart_recovers_namespaces_and_blocks(daemon_factory, tmp_path):
    ssd_dir = tmp_path / "ssd"
    d = daemon_factory(*ssd_args(ssd_dir, "32MiB", "--ssd-write-policy", "write_back"))
    with KVClient(d.socket) as c:
        ns = c.namespace("m", LAYOUT, tenant="t1")
        chains = [put_chain(ns, seed, 4) for seed in range(5)]
    assert d.stop() == 0                      # write-back: flushed at shutdown
    d2 = daemon_factory(*ssd_args(ssd_dir), workdir=tmp_path / "after")
    with KVClient(d2.socket) as c:
        assert [n.tenant for n in c.stats().namespaces] == ["t1"]
        ns = c.namespace("m", LAYOUT, tenant="t1")
        for keys, data in chains:
            assert get_exact(ns, keys, data) == 4
        assert tier(ssd_stats(c), "SSD").recovered_blocks == 20


def test_bench_ssd_smoke(tmp_path):
    r = subprocess.run([sys.executable, "-m", "kvstore", "bench", "ssd", "--dir", str(tmp_path),
                        "--dram", "8MiB", "--factor", "2", "--block-kib", "64", "--qd", "4",
                        "--client-threads", "2", "--repeat", "1", "--index-blocks", "20000",
                        "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["ssd_hits"] >= res["sdk_get_blocks"] - 16 * res["short_gets"] > 0
    assert res["acquire_vs_raw_read"] > 0
    assert res["checksum_failures"] == 0
    assert res["get_vs_raw_read"] > 0 and res["put_vs_raw_write"] > 0
    assert res["ssd_io"] == expected_ssd_io()   # io_uring wherever the kernel allows it
    assert res["index"]["array_bytes_per_block"] < 200
    # What each pass cost: the daemon's CPU is counted for the SDK passes only (the raw passes
    # run in this process), and the disk's busy time where tmp_path is on a block device.
    from kvstore.bench.ssd import disk_stat_path
    cost = res["cost"]
    assert set(cost) == {"raw_write", "raw_read", "sdk_put", "sdk_get"}
    for name in ("sdk_put", "sdk_get"):
        assert cost[name]["daemon_cpu_s_per_gb"] > 0 and cost[name]["client_cpu_s_per_gb"] > 0
    assert "daemon_cpu_s_per_gb" not in cost["raw_read"] | cost["raw_write"]
    on_disk = disk_stat_path(tmp_path) is not None
    for c in cost.values():
        assert ("disk_busy" in c) == on_disk
        if on_disk:
            assert 0 <= c["disk_busy"] <= 1.0 and c["disk_queue"] >= 0
    assert list(tmp_path.iterdir()) == []      # cleaned up


def test_one_daemon_per_ssd_dir(daemon_factory, tmp_path, shm_dir):
    ssd_dir = tmp_path / "ssd"
    first = daemon_factory(*ssd_args(ssd_dir))
    r = subprocess.run([sys.executable, "-m", "kvstore", "serve", "--socket",
                        str(tmp_path / "other.sock"), "--shm-dir", str(shm_dir),
                        *ssd_args(ssd_dir)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "in use by another kvstore daemon" in r.stderr
    assert f"(pid {first.proc.pid})" in r.stderr, r.stderr


def test_tmpfs_falls_back_to_buffered_io_and_says_so(daemon_factory, shm_dir):
    d = daemon_factory(*ssd_args(shm_dir / "ssd"))      # /dev/shm: tmpfs refuses O_DIRECT
    with KVClient(d.socket) as c:
        ns = c.namespace("m", LAYOUT)
        chains = [put_chain(ns, seed, 8) for seed in range(40)]
        for keys, data in chains:
            assert get_exact(ns, keys, data) == 8
        assert tier(ssd_stats(c), "SSD").promotions > 0
    if "refuses O_DIRECT" not in d.log():
        assert "O_DIRECT I/O" in d.log()   # this kernel's tmpfs accepts O_DIRECT
    else:
        assert "buffered I/O" in d.log()


def test_full_ssd_evicts_and_puts_keep_succeeding(daemon_factory, tmp_path):
    # SSD: one 8 MiB segment = 512 blocks; DRAM 256 blocks; 1600 blocks put.
    d = daemon_factory(*SMALL_DRAM, "--ssd-dir", str(tmp_path / "ssd"), "--ssd-bytes", "8MiB",
                       "--ssd-segment-bytes", "8MiB")
    with KVClient(d.socket) as c:
        ns = c.namespace("m", LAYOUT)
        chains = [put_chain(ns, seed, 16) for seed in range(100)]
        ssd = tier(ssd_stats(c), "SSD")
        assert ssd.evictions > 0 and ssd.blocks <= 512
        for keys, data in chains[-20:]:          # the most recent survive, byte-exact
            assert get_exact(ns, keys, data) == 16
        for keys, data in chains[:5]:            # the oldest were dropped (or are a prefix)
            assert get_exact(ns, keys, data) < 16


def test_deleted_ssd_block_stays_deleted_after_restart(daemon_factory, tmp_path):
    ssd_dir = tmp_path / "ssd"
    d = daemon_factory(*ssd_args(ssd_dir))
    with KVClient(d.socket) as c:
        ns = c.namespace("m", LAYOUT)
        keys, data = put_chain(ns, 3, 8)
        for seed in range(10, 50):               # demote the chain to SSD only
            put_chain(ns, seed, 8)
        assert set(ns.lookup(keys).tiers) == {"SSD"}
        assert ns.delete(keys[4:]) == 4
    d.kill()
    d2 = daemon_factory(*ssd_args(ssd_dir), workdir=tmp_path / "after")
    with KVClient(d2.socket) as c:
        ns = c.namespace("m", LAYOUT)
        assert ns.lookup(keys).num_cached == 4
        assert get_exact(ns, keys, data) == 4


def test_concurrent_gets_of_one_ssd_chain_share_the_promotion(daemon_factory, tmp_path):
    from concurrent.futures import ThreadPoolExecutor
    d = daemon_factory(*ssd_args(tmp_path / "ssd"))
    with KVClient(d.socket, io_threads=8) as c:
        ns = c.namespace("m", LAYOUT)
        keys, data = put_chain(ns, 5, 16)
        for seed in range(10, 50):
            put_chain(ns, seed, 8)
        assert set(ns.lookup(keys).tiers) == {"SSD"}
        before = tier(ssd_stats(c), "SSD").promotions
        with ThreadPoolExecutor(8) as ex:
            found = list(ex.map(lambda _: get_exact(ns, keys, data), range(8)))
        assert found == [16] * 8
        ssd = tier(ssd_stats(c), "SSD")
        assert ssd.promotions - before == 16      # each block read from SSD once, shared
        assert ssd.checksum_failures == 0


def test_streaming_client_gets_ssd_blocks(daemon_factory, tmp_path):
    """A client without the shared arena (remote) gets SSD blocks over gRPC, byte-exact."""
    d = daemon_factory(*ssd_args(tmp_path / "ssd"))
    with KVClient(d.socket) as local, KVClient(d.socket, shared_memory=False) as remote:
        ns = local.namespace("m", LAYOUT)
        keys, data = put_chain(ns, 9, 8)
        for seed in range(10, 45):
            put_chain(ns, seed, 8)
        rns = remote.namespace("m", LAYOUT)
        assert not remote.shared_memory
        assert set(rns.lookup(keys).tiers) == {"SSD"}
        assert get_exact(rns, keys, data) == 8


LAYOUT_32K = KVLayout(num_layers=2, num_kv_heads=8, head_dim=64, block_tokens=16, dtype="uint8")


def put_chain_of(ns, layout, seed: int, n_blocks: int):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n_blocks, *layout.block_shape), dtype=np.uint8)
    keys = ns.block_keys(rng.integers(0, 50000, n_blocks * layout.block_tokens))
    ns.put(keys, data).result(timeout=60)
    return keys, data


def get_prefix_exact(ns, layout, keys, data) -> int:
    out = np.empty((len(keys), *layout.block_shape), dtype=np.uint8)
    got = ns.get(keys, out=out).result(timeout=60)
    assert np.array_equal(np.asarray(got), data[:len(got)]), "served bytes differ from written"
    return len(got)


@pytest.mark.parametrize("restart", ["sigterm", "sigkill"])
def test_a_new_block_size_takes_segments_from_a_full_tier(daemon_factory, tmp_path, restart):
    """The SSD tier is full of 16 KiB blocks (every segment theirs); a second model with
    32 KiB blocks arrives. Its blocks must get SSD space — the coldest segments of the first
    size are emptied and reassigned — and everything served, before and after a restart,
    is byte-exact."""
    ssd_dir = tmp_path / "ssd"
    d = daemon_factory(*ssd_args(ssd_dir, "32MiB"))        # 4 segments of 8 MiB
    with KVClient(d.socket) as c:
        a = c.namespace("a", LAYOUT)
        old = [put_chain(a, seed, 64) for seed in range(32)]          # 2048 blocks: all slots
        # every slot but an eviction batch is taken (4 x 409 slots: each has a 4 KiB header)
        from kvstore.tiers.ssd.format import slots_per_segment
        assert tier(ssd_stats(c), "SSD").blocks >= 4 * slots_per_segment(8 << 20, BB) - 64
        b = c.namespace("b", LAYOUT_32K)
        new = [put_chain_of(b, LAYOUT_32K, 500 + seed, 32) for seed in range(12)]  # 12 MiB
        for keys, data in new:                                # all of it, most from SSD
            assert b.lookup(keys).num_cached == 32
            assert get_prefix_exact(b, LAYOUT_32K, keys, data) == 32
        s = tier(ssd_stats(c), "SSD")
        assert s.used_bytes <= 32 << 20 and s.evictions >= 512
        survivors = sum(get_prefix_exact(a, LAYOUT, keys, data) for keys, data in old[-8:])
        assert survivors > 0                                  # the newest 16 KiB blocks stay
    assert "given to 32768-byte blocks" in d.log()
    if restart == "sigterm":
        assert d.stop() == 0                                  # compacts the journal
    else:
        d.kill()                                              # replays dels + segment records
    d2 = daemon_factory(*ssd_args(ssd_dir, "32MiB"), workdir=tmp_path / "after")
    with KVClient(d2.socket) as c:
        b = c.namespace("b", LAYOUT_32K)
        a = c.namespace("a", LAYOUT)
        assert sum(get_prefix_exact(b, LAYOUT_32K, k, v) for k, v in new) == 12 * 32
        for keys, data in old:                                # what is found is exact
            get_prefix_exact(a, LAYOUT, keys, data)
        assert tier(ssd_stats(c), "SSD").checksum_failures == 0


def test_write_through_selective_writes_only_blocks_that_were_read(daemon_factory, tmp_path):
    """SGLang HiCache's write_through_selective: a block reaches SSD once gets read it
    ssd_write_hits times; blocks nobody read are dropped, not demoted, when DRAM evicts them."""
    ssd_dir = tmp_path / "ssd"
    args = ssd_args(ssd_dir, "32MiB", "--ssd-write-policy", "write_through_selective",
                    "--ssd-write-hits", "2")
    d = daemon_factory(*args)
    with KVClient(d.socket) as c:
        ns = c.namespace("m", LAYOUT)
        hot, data_hot = put_chain(ns, 1, 8)
        warm, data_warm = put_chain(ns, 2, 8)
        cold, _ = put_chain(ns, 3, 8)
        assert tier(ssd_stats(c), "SSD").blocks == 0          # nothing written at commit
        assert get_exact(ns, hot, data_hot) == 8
        assert get_exact(ns, warm, data_warm) == 8
        assert tier(ssd_stats(c), "SSD").blocks == 0          # one read: below the threshold
        assert get_exact(ns, hot, data_hot) == 8              # the second read: written
        deadline = time.monotonic() + 10
        while tier(ssd_stats(c), "SSD").blocks < 8:
            assert time.monotonic() < deadline, "hot blocks never reached SSD"
            time.sleep(0.02)
        assert tier(ssd_stats(c), "SSD").bytes_in == 8 * BB
        for seed in range(10):                                # 320 newer blocks: DRAM evicts all
            put_chain(ns, 100 + seed, 32)
        assert ns.lookup(hot).tiers == ["SSD"] * 8           # demoted
        assert ns.lookup(warm).num_cached == 0                # dropped
        assert ns.lookup(cold).num_cached == 0
        assert get_exact(ns, hot, data_hot) == 8
    d.kill()                                                  # written blocks are durable
    d2 = daemon_factory(*args, workdir=tmp_path / "after")
    with KVClient(d2.socket) as c:
        ns = c.namespace("m", LAYOUT)
        assert get_exact(ns, hot, data_hot) == 8
        assert ns.lookup(warm).num_cached == 0
