"""A restarted daemon serves while its SSD index loads (kvstore.tiers.ssd.tier.start_recovery),
through real daemon processes and real files: DRAM puts, gets and lookups are answered before
the load is done, every recovered block is then served byte for byte, a delete during the load
sticks (across a restart too), a put of a key still in the loading index wins over the journaled
copy, and a SIGKILL mid-load loses nothing. The load is slowed with the documented
``ssd_recovery_batch`` setting and the internal ``$KVSTORE_INTERNAL_SSD_RECOVERY_LIMIT`` (400
blocks at 60 blocks/s: ~7 s; entries land by depth, so a chain's last block comes with the last
25)."""
from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from kvstore.client import KVClient
from kvstore.testing.daemon import DaemonProcess
from support.ssd import LAYOUT, chain, get_exact, put_chain, ssd_args, ssd_stats, tier

CHAINS, BLOCKS = 25, 16          # 400 blocks, all on SSD after the restart
SLOW = ("--ssd-recovery-batch", "8")
SLOW_ENV = {"KVSTORE_INTERNAL_SSD_RECOVERY_LIMIT": "60"}   # blocks/s


def _populate(daemon_factory, ssd_dir) -> dict[int, list[bytes]]:
    d = daemon_factory(*ssd_args(ssd_dir, "32MiB"))
    with KVClient(d.socket) as c:
        ns = c.namespace("m", LAYOUT)
        keys = {seed: put_chain(ns, seed, BLOCKS)[0] for seed in range(CHAINS)}
        assert tier(ssd_stats(c), "SSD").blocks == CHAINS * BLOCKS
    assert d.stop() == 0
    return keys


def _slow_restart(tmp_path, shm_dir, ssd_dir, name: str) -> DaemonProcess:
    wd = tmp_path / name
    wd.mkdir()
    return DaemonProcess(wd, shm_dir, ssd_args(ssd_dir, "32MiB", *SLOW), SLOW_ENV).start(
        wait_ssd_loaded=False)


def _loading(c) -> bool:
    ssd = tier(ssd_stats(c), "SSD")
    return ssd.ready_bytes < ssd.capacity_bytes


def _wait_loaded(c, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while _loading(c):
        assert time.monotonic() < deadline, "the SSD index did not load"
        time.sleep(0.05)


def test_serves_dram_while_the_index_loads_then_every_ssd_block(daemon_factory, tmp_path,
                                                                 shm_dir):
    ssd_dir = tmp_path / "ssd"
    keys = _populate(daemon_factory, ssd_dir)
    d = _slow_restart(tmp_path, shm_dir, ssd_dir, "after")
    try:
        with KVClient(d.socket) as c, ThreadPoolExecutor(1) as pool:
            assert _loading(c), "the index loaded before the first answer: test too fast"
            ns = c.namespace("m", LAYOUT)
            # DRAM serves at once: a new chain is put and read back byte-exact, looked up.
            new_keys, new_data = put_chain(ns, 1000, 8)
            assert get_exact(ns, new_keys, new_data) == 8
            assert ns.lookup(new_keys).num_cached == 8
            # A put of a key the loading index holds (chain 3's last block: depth 15 lands
            # last): the newer bytes win, and no second block appears.
            assert tier(ssd_stats(c), "SSD").blocks <= CHAINS * BLOCKS - CHAINS, \
                "the last blocks of the chains are restored already: test too slow"
            mine = np.full((1, *LAYOUT.block_shape), 7, dtype=np.uint8)
            ns.put(keys[3][-1:], mine).result(timeout=60)
            # A delete of a block still only in the loading index (chain 5's last) sticks; the
            # Delete answers once that is durable (after the load).
            deleting = pool.submit(ns.delete, keys[5][-1:])
            time.sleep(0.3)
            assert _loading(c), "the index loaded before the delete and put were made"
            assert tier(ssd_stats(c), "SSD").blocks < CHAINS * BLOCKS   # still loading
            deleting.result(timeout=60)
            _wait_loaded(c)
            assert "SSD tier: index loaded" in d.log()
            # Every recovered block is served byte for byte, promoted from SSD.
            served = 0
            for seed, ks in keys.items():
                data = chain(seed, BLOCKS)[1]
                if seed == 3:
                    data = np.concatenate([data[:-1], mine])
                n = get_exact(ns, ks, data)
                assert n == (BLOCKS - 1 if seed == 5 else BLOCKS), (seed, n)
                served += n
            assert served == CHAINS * BLOCKS - 1
            assert ns.lookup(keys[5]).num_cached == BLOCKS - 1
            st = ssd_stats(c)
            assert tier(st, "SSD").checksum_failures == 0
            assert tier(st, "SSD").promotions > 0
            # No duplicate rows: the namespace holds each key once.
            assert sum(n.blocks for n in c.stats().namespaces) == CHAINS * BLOCKS - 1 + 8
        # The put during the load was written through once loaded: after a restart the newer
        # bytes come back from SSD, and the deleted block stays deleted.
        assert d.stop() == 0
    finally:
        d.close()
    d2 = daemon_factory(*ssd_args(ssd_dir, "32MiB"), workdir=tmp_path / "again")
    with KVClient(d2.socket) as c:
        ns = c.namespace("m", LAYOUT)
        assert get_exact(ns, keys[3], np.concatenate([chain(3, BLOCKS)[1][:-1], mine])) == BLOCKS
        assert get_exact(ns, keys[5], chain(5, BLOCKS)[1]) == BLOCKS - 1
        assert get_exact(ns, new_keys, new_data) == 8


def test_sigkill_while_the_index_loads_loses_nothing(daemon_factory, tmp_path, shm_dir):
    ssd_dir = tmp_path / "ssd"
    keys = _populate(daemon_factory, ssd_dir)
    d = _slow_restart(tmp_path, shm_dir, ssd_dir, "killed")
    try:
        with KVClient(d.socket) as c:
            ns = c.namespace("m", LAYOUT)
            time.sleep(0.5)
            assert _loading(c) and tier(ssd_stats(c), "SSD").blocks > 0   # part-way through
            # Write-through: durable when acknowledged, during the load too.
            late_keys, late_data = put_chain(ns, 2000, 4)
            assert _loading(c)
        d.kill()
    finally:
        d.close()
    d2 = daemon_factory(*ssd_args(ssd_dir, "32MiB"), workdir=tmp_path / "again")
    with KVClient(d2.socket) as c:
        ns = c.namespace("m", LAYOUT)
        for seed, ks in keys.items():
            assert get_exact(ns, ks, chain(seed, BLOCKS)[1]) == BLOCKS, seed
        assert get_exact(ns, late_keys, late_data) == 4
        assert tier(ssd_stats(c), "SSD").recovered_blocks == CHAINS * BLOCKS + 4


def test_write_through_commits_during_the_load_survive_a_sigkill(daemon_factory, tmp_path,
                                                                 shm_dir):
    # 48 blocks acknowledged while the index loads (in the loading namespace and in one first
    # seen during the load), then SIGKILL before the load ends: every one comes back exact,
    # and so does every block the load was restoring.
    ssd_dir = tmp_path / "ssd"
    keys = _populate(daemon_factory, ssd_dir)
    d = _slow_restart(tmp_path, shm_dir, ssd_dir, "killed")
    late = []
    try:
        with KVClient(d.socket) as c:
            spaces = [c.namespace("m", LAYOUT), c.namespace("new-model", LAYOUT)]
            late = [put_chain(spaces[i % 2], 3000 + i, BLOCKS) for i in range(3)]
            assert _loading(c), "the load ended before the kill: test too slow"
        d.kill()
    finally:
        d.close()
    d2 = daemon_factory(*ssd_args(ssd_dir, "32MiB"), workdir=tmp_path / "again")
    with KVClient(d2.socket) as c:
        spaces = [c.namespace("m", LAYOUT), c.namespace("new-model", LAYOUT)]
        for i, (ks, data) in enumerate(late):
            assert get_exact(spaces[i % 2], ks, data) == BLOCKS, i
        for seed, ks in keys.items():
            assert get_exact(spaces[0], ks, chain(seed, BLOCKS)[1]) == BLOCKS, seed
        st = tier(ssd_stats(c), "SSD")
        assert st.recovered_blocks == CHAINS * BLOCKS + 3 * BLOCKS
        assert st.checksum_failures == 0


def test_stopped_while_loading_shuts_down_cleanly_and_recovers_everything(
        daemon_factory, tmp_path, shm_dir):
    ssd_dir = tmp_path / "ssd"
    keys = _populate(daemon_factory, ssd_dir)
    d = _slow_restart(tmp_path, shm_dir, ssd_dir, "stopped")
    try:
        out = subprocess.run([sys.executable, "-m", "kvstore", "stats", "--socket", d.socket],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "loading index:" in out.stdout, out.stdout      # the SSD row says so
        with KVClient(d.socket) as c:
            assert _loading(c)
        assert d.stop() == 0
        assert "stopped while loading the index" in d.log()
    finally:
        d.close()
    d2 = daemon_factory(*ssd_args(ssd_dir, "32MiB"), workdir=tmp_path / "again")
    with KVClient(d2.socket) as c:
        ns = c.namespace("m", LAYOUT)
        assert sum(get_exact(ns, ks, chain(seed, BLOCKS)[1]) for seed, ks in keys.items()) \
            == CHAINS * BLOCKS


def test_write_through_during_a_load_from_the_slab_files_survives_a_sigkill(
        daemon_factory, tmp_path, shm_dir):
    # The journal is lost: the load rebuilds the index from the slot headers. Blocks committed
    # meanwhile are journaled in a new, headerless journal (so the next start scans again) and
    # survive a SIGKILL before the load ends, with every scanned block.
    ssd_dir = tmp_path / "ssd"
    keys = _populate(daemon_factory, ssd_dir)
    (ssd_dir / "journal").unlink()
    d = _slow_restart(tmp_path, shm_dir, ssd_dir, "killed")
    try:
        with KVClient(d.socket) as c:
            ns = c.namespace("m", LAYOUT)
            late = [put_chain(ns, 4000 + i, BLOCKS) for i in range(2)]
            assert _loading(c), "the load ended before the kill: test too slow"
        d.kill()
    finally:
        d.close()
    d2 = daemon_factory(*ssd_args(ssd_dir, "32MiB"), workdir=tmp_path / "again")
    with KVClient(d2.socket) as c:
        ns = c.namespace("m", LAYOUT)
        for ks, data in late:
            assert get_exact(ns, ks, data) == BLOCKS
        for seed, ks in keys.items():
            assert get_exact(ns, ks, chain(seed, BLOCKS)[1]) == BLOCKS, seed
        st = tier(ssd_stats(c), "SSD")
        assert st.recovered_blocks == CHAINS * BLOCKS + 2 * BLOCKS
        assert st.checksum_failures == 0
    assert "rebuilding the index from the slab files" in d2.log()
