"""Durability of the SSD index through real daemon processes and real files: a damaged, emptied
or deleted journal loses nothing the slab files still hold intact (replay resynchronises past
damaged frames; the slot headers rebuild the rest), a corrupt slot is a miss, the journal is
0600, an old-format directory is refused. Every block served is compared byte for byte."""
from __future__ import annotations

import json
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from kvstore.client import KVClient
from kvstore.tiers.ssd import journal as jr
from support.ssd import LAYOUT, chain, get_exact, payload_offset, put_chain, ssd_args, ssd_stats, tier

CHAINS, BLOCKS = 25, 16          # 400 blocks: all of them on SSD, most only there


def _populate(daemon_factory, ssd_dir, *, stop=True):
    """400 blocks in two namespaces (one with a tenant); returns {(ns name, seed): keys}."""
    d = daemon_factory(*ssd_args(ssd_dir, "32MiB"))
    out = {}
    with KVClient(d.socket) as c:
        spaces = {"m": c.namespace("m", LAYOUT), "t": c.namespace("m2", LAYOUT, tenant="acme")}
        for seed in range(CHAINS):
            name = "m" if seed % 2 else "t"
            out[(name, seed)] = put_chain(spaces[name], seed, BLOCKS)[0]
        assert tier(ssd_stats(c), "SSD").blocks == CHAINS * BLOCKS
    if stop:
        assert d.stop() == 0
    else:
        d.kill()
    return out


def _served(daemon_factory, ssd_dir, chains, workdir) -> tuple[int, object]:
    """Restart on ssd_dir; blocks served byte-exact across all chains, and the daemon."""
    d = daemon_factory(*ssd_args(ssd_dir, "32MiB"), workdir=workdir)
    with KVClient(d.socket) as c:
        # Namespaces come back before any client registers them (journal or slot headers).
        assert sorted((n.model_id, n.tenant) for n in c.stats().namespaces) == \
            [("m", ""), ("m2", "acme")]
        spaces = {"m": c.namespace("m", LAYOUT), "t": c.namespace("m2", LAYOUT, tenant="acme")}
        n = 0
        for (name, seed), keys in chains.items():
            n += get_exact(spaces[name], keys, chain(seed, BLOCKS)[1])
        assert tier(ssd_stats(c), "SSD").checksum_failures == 0
    return n, d


def test_flipped_bytes_near_the_journal_start_lose_nothing(daemon_factory, tmp_path):
    ssd_dir = tmp_path / "ssd"
    chains = _populate(daemon_factory, ssd_dir)
    j = ssd_dir / "journal"
    raw = bytearray(j.read_bytes())
    for i in range(24, 28):                     # inside the first frames (header, namespaces)
        raw[i] ^= 0xA5
    j.write_bytes(bytes(raw))
    n, d = _served(daemon_factory, ssd_dir, chains, tmp_path / "after")
    assert n == CHAINS * BLOCKS
    assert "skipping" in d.log() and "slab scan read" in d.log()


def test_zeroed_region_mid_journal_loses_nothing(daemon_factory, tmp_path):
    """SIGKILL: no compaction, one PUTS frame per commit; 256 zeroed bytes mid-file."""
    ssd_dir = tmp_path / "ssd"
    chains = _populate(daemon_factory, ssd_dir, stop=False)
    j = ssd_dir / "journal"
    raw = bytearray(j.read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + 256] = bytes(256)
    j.write_bytes(bytes(raw))
    n, d = _served(daemon_factory, ssd_dir, chains, tmp_path / "after")
    assert n == CHAINS * BLOCKS
    assert "resynchronised" in d.log()


@pytest.mark.parametrize("how", ["deleted", "emptied", "truncated"])
def test_lost_journal_is_rebuilt_from_the_slab_files(daemon_factory, tmp_path, how):
    ssd_dir = tmp_path / "ssd"
    chains = _populate(daemon_factory, ssd_dir)
    j = ssd_dir / "journal"
    if how == "deleted":
        j.unlink()
    elif how == "emptied":
        j.write_bytes(b"")
    else:
        j.write_bytes(j.read_bytes()[:40])      # a header frame and a torn namespace frame
    n, d = _served(daemon_factory, ssd_dir, chains, tmp_path / "after")
    assert n == CHAINS * BLOCKS
    log = d.log()
    assert "rebuilding the index from the slab files" in log
    assert f"recovered {CHAINS * BLOCKS} blocks" in log
    # ... and the rebuilt journal is complete again: a plain restart needs no scan.
    assert d.stop() == 0
    n, d = _served(daemon_factory, ssd_dir, chains, tmp_path / "again")
    assert n == CHAINS * BLOCKS and "slab scan" not in d.log()


def test_corrupt_slot_is_a_miss_when_rebuilt_by_scanning(daemon_factory, tmp_path):
    """Journal gone and one block's bytes flipped: the scan restores its header (intact), the
    read fails the checksum: a miss, never served; every other block is served exactly."""
    ssd_dir = tmp_path / "ssd"
    d = daemon_factory(*ssd_args(ssd_dir, "32MiB"))
    with KVClient(d.socket) as c:
        ns = c.namespace("m", LAYOUT)
        keys, data = put_chain(ns, 7, 3)         # slots 0, 1, 2 of the first segment
        other = put_chain(ns, 8, 4)
    assert d.stop() == 0
    (ssd_dir / "journal").unlink()
    with open(ssd_dir / "seg-00000.slab", "r+b") as f:
        f.seek(payload_offset(1) + 99)
        b = f.read(4)
        f.seek(payload_offset(1) + 99)
        f.write(bytes(x ^ 0xFF for x in b))
    d2 = daemon_factory(*ssd_args(ssd_dir, "32MiB"), workdir=tmp_path / "after")
    with KVClient(d2.socket) as c:
        ns = c.namespace("m", LAYOUT)
        assert get_exact(ns, keys, data) == 1    # block 1 fails its checksum: prefix of 1
        assert tier(ssd_stats(c), "SSD").checksum_failures == 1
        assert get_exact(ns, *other) == 4


def test_corrupt_slot_header_frees_that_slot_only(daemon_factory, tmp_path):
    ssd_dir = tmp_path / "ssd"
    d = daemon_factory(*ssd_args(ssd_dir, "32MiB"))
    with KVClient(d.socket) as c:
        ns = c.namespace("m", LAYOUT)
        keys, data = put_chain(ns, 7, 3)
    assert d.stop() == 0
    (ssd_dir / "journal").unlink()
    with open(ssd_dir / "seg-00000.slab", "r+b") as f:
        f.seek(payload_offset(2) - 4096 + 40)   # inside slot 2's header (its key)
        f.write(b"\x00\x01\x02\x03")
    d2 = daemon_factory(*ssd_args(ssd_dir, "32MiB"), workdir=tmp_path / "after")
    with KVClient(d2.socket) as c:
        ns = c.namespace("m", LAYOUT)
        assert ns.lookup(keys).num_cached == 2
        assert get_exact(ns, keys, data) == 2
        assert tier(ssd_stats(c), "SSD").blocks == 2


def test_newest_slot_wins_when_two_claim_one_key(daemon_factory, tmp_path):
    """A key put, deleted and put again with other bytes: with the journal lost, two slots hold
    a verified header for it; the newer (by sequence number) is the one served."""
    ssd_dir = tmp_path / "ssd"
    d = daemon_factory(*ssd_args(ssd_dir, "32MiB"))
    tokens, first = chain(3, 2)
    second = (first ^ 0x5A).astype(np.uint8)
    with KVClient(d.socket) as c:
        ns = c.namespace("m", LAYOUT)
        keys = ns.block_keys(tokens)
        ns.put(keys, first).result(timeout=60)
        assert ns.delete(keys) == 2
        ns.put(keys, second).result(timeout=60)
        assert get_exact(ns, keys, second) == 2
    assert d.stop() == 0
    (ssd_dir / "journal").unlink()
    d2 = daemon_factory(*ssd_args(ssd_dir, "32MiB"), workdir=tmp_path / "after")
    with KVClient(d2.socket) as c:
        ns = c.namespace("m", LAYOUT)
        assert get_exact(ns, keys, second) == 2
        assert tier(ssd_stats(c), "SSD").blocks == 2


def test_journal_and_temp_files_are_private(daemon_factory, tmp_path):
    ssd_dir = tmp_path / "ssd"
    d = daemon_factory(*ssd_args(ssd_dir))
    with KVClient(d.socket) as c:
        put_chain(c.namespace("m", LAYOUT, tenant="acme"), 1, 2)
    assert stat.S_IMODE((ssd_dir / "journal").stat().st_mode) == 0o600
    assert d.stop() == 0                        # compaction: temp file renamed over it
    for name in ("journal", "superblock"):
        assert stat.S_IMODE((ssd_dir / name).stat().st_mode) == 0o600, name
    # A compaction temp file left by a crash, world-readable: reused with mode 0600.
    pool = ThreadPoolExecutor(1)
    j = jr.Journal(tmp_path / "j2", pool)
    (tmp_path / "j2.compact").write_bytes(b"x")
    (tmp_path / "j2.compact").chmod(0o644)
    j.rewrite([])
    j.close()
    pool.shutdown()
    assert stat.S_IMODE((tmp_path / "j2").stat().st_mode) == 0o600


def test_old_format_directory_is_refused_with_a_clear_message(tmp_path, shm_dir):
    ssd_dir = tmp_path / "ssd"
    ssd_dir.mkdir()
    (ssd_dir / "superblock").write_bytes(b"KVSTSSD\x00" + json.dumps(
        {"format_version": 1, "segment_bytes": 8 << 20}).encode())
    r = subprocess.run([sys.executable, "-m", "kvstore", "serve", "--socket",
                        str(tmp_path / "s.sock"), "--shm-dir", str(shm_dir),
                        *ssd_args(ssd_dir)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "format version 1" in r.stderr and "remove the directory" in r.stderr
    assert not (ssd_dir / "seg-00000.slab").exists()     # nothing touched


# -- the parts on real files, without a daemon ------------------------------------------------
def _puts(addrs, key_base=0, seq=1):
    e = np.zeros(len(addrs), dtype=jr.PUT_DTYPE)
    e["addr"] = addrs
    e["key"][:, 0] = np.arange(len(addrs)) + key_base
    e["seq"] = seq
    return e


def _ns():
    return jr.NamespaceRecord(b"n" * 16, "m", "", {"num_layers": 1})


def test_replay_skips_a_damaged_frame_and_applies_every_other(tmp_path):
    pool = ThreadPoolExecutor(1)
    frames = [jr.encode_ns(_ns()), jr.encode_seg(0, 4096)] + \
        [jr.encode_puts(_puts([i], key_base=i)) for i in range(10)]
    j = jr.Journal(tmp_path / "journal", pool)
    j.rewrite(frames)
    j.close()
    whole = (tmp_path / "journal").read_bytes()
    hit = whole.index(frames[6]) + 30           # inside the PUTS frame of slot 4
    for mutate in (lambda b: b.__setitem__(slice(hit, hit + 4), b"\xff\xff\xff\xff"),
                   lambda b: b.__setitem__(slice(hit - 20, hit + 40), bytes(60))):
        bad = bytearray(whole)
        mutate(bad)
        (tmp_path / "journal").write_bytes(bytes(bad))
        st_ = jr.Journal(tmp_path / "journal", pool).replay()
        assert st_.damaged and st_.damaged_regions == 1 and st_.has_header
        assert sorted(st_.puts["addr"].tolist()) == [0, 1, 2, 3, 5, 6, 7, 8, 9]
        assert st_.segments == {0: 4096} and len(st_.namespaces) == 1
    pool.shutdown()


def test_a_payload_holding_the_magic_is_never_taken_for_a_frame(tmp_path):
    """A PUTS payload that embeds a complete, valid DEL frame: walked over when intact, and
    after a damaged region only real frames are applied (the embedded one sits inside a frame
    whose own checksum verifies, which resync reaches first)."""
    pool = ThreadPoolExecutor(1)
    fake = jr.encode_del(5, 1 << 62)            # would delete slot 5 if it were believed
    e = _puts([5, 6])
    raw = bytearray(e.tobytes())
    raw[4:4 + len(fake)] = fake                 # the first entry's key and parent fields
    e = np.frombuffer(bytes(raw), dtype=jr.PUT_DTYPE).copy()
    e["addr"] = [5, 6]
    frames = [jr.encode_ns(_ns()), jr.encode_seg(0, 4096), jr.encode_puts(e)]
    j = jr.Journal(tmp_path / "journal", pool)
    j.rewrite(frames)
    j.close()
    assert fake in (tmp_path / "journal").read_bytes()
    st_ = jr.Journal(tmp_path / "journal", pool).replay()
    assert not st_.damaged and sorted(st_.puts["addr"].tolist()) == [5, 6] and not st_.deleted
    whole = bytearray((tmp_path / "journal").read_bytes())
    seg_at = whole.index(frames[1])
    whole[seg_at + 20] ^= 0xFF                  # the frame before it is damaged: resync
    (tmp_path / "journal").write_bytes(bytes(whole))
    st_ = jr.Journal(tmp_path / "journal", pool).replay()
    assert st_.damaged_regions == 1 and st_.segments == {}
    assert sorted(st_.puts["addr"].tolist()) == [5, 6] and not st_.deleted
    pool.shutdown()


def test_scan_finds_verified_slot_headers_only(tmp_path):
    import mmap
    import os

    from kvstore.tiers.ssd.files import SlabFiles
    ssd = SlabFiles(tmp_path, 1 << 20, 1 << 20, io_threads=2)
    ssd.open()
    keys = [os.urandom(16) for _ in range(3)]
    try:
        ssd.take_segment(8192)
        addrs = [ssd.allocate(8192) for _ in keys]
        buf = mmap.mmap(-1, 8192)
        for a, k in zip(addrs, keys):
            buf[:] = os.urandom(8192)
            ssd.write_slot(a, memoryview(buf), k, 8000, tag=b"tag-" + k[:4])
    finally:
        ssd.close()
    with open(tmp_path / "seg-00000.slab", "r+b") as f:     # slot 1's header: one flipped bit
        f.seek(4096 + (8192 + 4096) + 100)
        b = f.read(1)
        f.seek(4096 + (8192 + 4096) + 100)
        f.write(bytes([b[0] ^ 1]))
    again = SlabFiles(tmp_path, 1 << 20)
    again.open()
    try:
        found, fig = again.scan()
        assert fig["segments"] == 1 and fig["slots_found"] == 2
        assert [(s.addr, s.key, s.tag) for s in found] == \
            [(addrs[i], keys[i], b"tag-" + keys[i][:4]) for i in (0, 2)]
        assert found[0].seq < found[1].seq
        assert again.segments[0].slot_bytes == 8192      # the size came from the segment header
    finally:
        again.close()
