"""The SSD tier at the edges of its start-up, through real daemon processes and real
filesystems: an --ssd-bytes larger than the free disk is refused before anything is
preallocated, a failed start removes what it created, and a restart never misreads what a
failed start left."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from kvstore.client import KVClient
from support.ssd import LAYOUT, get_exact, put_chain, ssd_args, ssd_stats, tier


@pytest.fixture
def small_fs(tmp_path):
    """A 24 MiB tmpfs of our own (never the shared disk): a disk too small for the test."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m,mode=0700", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _serve(tmp_path, shm_dir, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvstore", "serve", "--socket",
                           str(tmp_path / "refused.sock"), "--shm-dir", str(shm_dir), *args],
                          capture_output=True, text=True, timeout=120)


def test_ssd_bytes_larger_than_the_free_disk_is_refused_up_front(small_fs, tmp_path, shm_dir,
                                                                 daemon_factory):
    free_before = _free(small_fs)
    r = _serve(tmp_path, shm_dir, *ssd_args(small_fs / "ssd", "64MiB"))
    assert r.returncode == 2, r.stderr
    assert "ssd_bytes" in r.stderr and "free" in r.stderr and "lower --ssd-bytes" in r.stderr
    # Nothing was preallocated and nothing is left behind: not the slab files, not the
    # superblock, not the directory this start created.
    assert _free(small_fs) == free_before
    assert list(small_fs.iterdir()) == []
    # A restart with a size that fits starts clean: no journal is reported missing.
    d = daemon_factory(*ssd_args(small_fs / "ssd", "16MiB"))
    with KVClient(d.socket) as c:
        ns = c.namespace("m", LAYOUT)
        keys, data = put_chain(ns, 1, 8)
        assert get_exact(ns, keys, data) == 8
        assert tier(ssd_stats(c), "SSD").capacity_bytes == 16 << 20
    assert d.stop() == 0
    assert "journal" not in d.log(), d.log()


def test_a_start_that_fails_after_opening_the_ssd_tier_removes_what_it_created(
        tmp_path, shm_dir, daemon_factory):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        port = busy.getsockname()[1]
        r = _serve(tmp_path, shm_dir, *ssd_args(tmp_path / "fresh" / "ssd", "16MiB"),
                   "--metrics-port", str(port))
    finally:
        busy.close()
    assert r.returncode == 1, r.stderr
    assert "metrics_port" in r.stderr
    assert not (tmp_path / "fresh").exists()
    # An existing directory keeps everything it had when a later start fails.
    ssd_dir = tmp_path / "kept"
    d = daemon_factory(*ssd_args(ssd_dir, "16MiB"))
    with KVClient(d.socket) as c:
        keys, data = put_chain(c.namespace("m", LAYOUT), 2, 8)
    assert d.stop() == 0
    before = sorted(p.name for p in ssd_dir.iterdir())
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        r = _serve(tmp_path, shm_dir, *ssd_args(ssd_dir, "16MiB"),
                   "--metrics-port", str(busy.getsockname()[1]))
    finally:
        busy.close()
    assert r.returncode == 1, r.stderr
    assert sorted(p.name for p in ssd_dir.iterdir()) == before
    d = daemon_factory(*ssd_args(ssd_dir, "16MiB"), workdir=tmp_path / "again")
    with KVClient(d.socket) as c:
        assert get_exact(c.namespace("m", LAYOUT), keys, data) == 8
    assert "journal" not in d.log().replace("journal records", ""), d.log()


def _max_lookup_latency_s(sock: str, namespace_id: bytes, keys: bytes, stop) -> list[float]:
    """Lookup RPCs back to back until ``stop`` is set; their latencies."""
    import time

    import grpc

    from kvstore.v1 import kvstore_pb2 as pb
    from kvstore.v1 import kvstore_pb2_grpc as pb_grpc
    out = []
    with grpc.insecure_channel(f"unix:{sock}") as ch:
        stub = pb_grpc.KVStoreStub(ch)
        while not stop.is_set():
            t0 = time.monotonic()
            stub.Lookup(pb.LookupRequest(namespace_id=namespace_id, keys=keys), timeout=30)
            out.append(time.monotonic() - t0)
            time.sleep(0.002)
    return out


def test_write_back_eviction_does_not_stall_other_clients(daemon_factory, tmp_path):
    # A put that evicts dirty write-back blocks waits for their SSD writes (40 ms each on this
    # slowed disk, 4 I/O threads); another client's lookups must not wait with it. With the
    # writes on the event loop, a lookup waited for the whole batch (about 1 s here). The
    # bound is generous for a shared machine: undisturbed, the worst lookup takes ~10 ms.
    import threading
    from concurrent.futures import ThreadPoolExecutor

    d = daemon_factory(*ssd_args(tmp_path / "ssd", "32MiB", "--ssd-write-policy", "write_back"),
                       env={"KVSTORE_TEST_SSD_WRITE_DELAY_S": "0.04"})
    with KVClient(d.socket) as writer, KVClient(d.socket) as reader:
        ns = writer.namespace("m", LAYOUT)
        chains = [put_chain(ns, seed, 16) for seed in range(16)]     # DRAM full: 256 blocks
        probe = reader.namespace("m", LAYOUT)
        from kvstore.core.keys import pack_keys
        stop = threading.Event()
        with ThreadPoolExecutor(1) as pool:
            lat = pool.submit(_max_lookup_latency_s, d.socket, probe.namespace_id,
                              pack_keys(chains[-1][0]), stop)
            try:
                more = [put_chain(ns, 100 + seed, 16) for seed in range(8)]   # evicts 128
            finally:
                stop.set()
            latencies = lat.result(timeout=60)
        assert len(latencies) > 10
        worst = max(latencies)
        for keys, data in chains + more:
            assert get_exact(ns, keys, data) == 16
        st = ssd_stats(writer)
        assert tier(st, "SSD").checksum_failures == 0
        assert tier(st, "DRAM").demotions >= 128
    print(f"worst lookup during write-back evictions: {worst * 1e3:.1f} ms "
          f"({len(latencies)} lookups)")
    assert worst < 0.15, f"a lookup waited {worst * 1e3:.0f} ms behind a write-back eviction"


def _flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damaged", [("superblock",), ("superblock", "superblock.copy")])
def test_a_flipped_byte_in_the_superblock_is_repaired(daemon_factory, tmp_path, damaged):
    # One flipped bit in the superblock made the whole directory unusable ("written by SSD
    # format version None"); every slot still describes itself. With its copy intact the copy
    # restores it; with both damaged the slab files' segment headers rebuild it.
    ssd_dir = tmp_path / "ssd"
    d = daemon_factory(*ssd_args(ssd_dir, "32MiB"))
    with KVClient(d.socket) as c:
        ns = c.namespace("m", LAYOUT)
        chains = [put_chain(ns, seed, 16) for seed in range(4)]
    assert d.stop() == 0
    for name in damaged:
        _flip(ssd_dir / name, 10)            # inside the "format_version" field name
    d = daemon_factory(*ssd_args(ssd_dir, "32MiB"), workdir=tmp_path / "after")
    with KVClient(d.socket) as c:
        ns = c.namespace("m", LAYOUT)
        for keys, data in chains:
            assert get_exact(ns, keys, data) == 16
        st = tier(ssd_stats(c), "SSD")
        assert st.recovered_blocks == 64 and st.checksum_failures == 0
    log = d.log()
    if len(damaged) == 1:
        assert "superblock is damaged (checksum mismatch): restored from its copy" in log, log
    else:
        assert "rebuilt from the slab files' segment headers" in log, log
    assert d.stop() == 0
    # Both copies are intact again: a third start says nothing about them.
    d = daemon_factory(*ssd_args(ssd_dir, "32MiB"), workdir=tmp_path / "third")
    assert "superblock" not in d.log()
    assert (ssd_dir / "superblock").read_bytes() == (ssd_dir / "superblock.copy").read_bytes()
