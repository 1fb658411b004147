"""Same-host lookups from the daemon's shared-memory index snapshot (kvstore/core/shmindex.py):
equal to the Lookup RPC's answers through puts, deletes, evictions and SSD demotions; never a
wrong answer under a concurrent writer; none for untrusted tenants; re-mapped after a restart;
and the `kvstore bench control` smoke run."""
from __future__ import annotations

import json
import multiprocessing as mp
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.core import shmindex
from kvstore.client import KVClient, KVStoreError, Unavailable
from kvstore.core.layout import KVLayout
from support.net import tcp_port

LAYOUT = KVLayout(num_layers=2, num_kv_heads=4, head_dim=64, block_tokens=16, dtype="uint8")
SMALL_DRAM = ("--dram-bytes", "4MiB", "--chunk-bytes", "1MiB")   # 256 blocks of 16 KiB


def _kv(n: int, fill: int) -> np.ndarray:
    return np.full((n, *LAYOUT.block_shape), fill, dtype=np.uint8)


def _both(ns, keys):
    """(local answer, gRPC answer) of one lookup; the local one must not have used an RPC."""
    before = ns.local_lookups_answered
    local = ns.lookup(keys)
    assert ns.local_lookups_answered == before + 1, "the snapshot did not answer"
    ns.local_lookups = False
    try:
        remote = ns.lookup(keys)
    finally:
        ns.local_lookups = True
    return (local.num_cached, local.tiers), (remote.num_cached, remote.tiers)


def test_local_lookups_equal_grpc_through_put_delete_evict_demote(daemon_factory, tmp_path):
    d = daemon_factory(*SMALL_DRAM, "--ssd-dir", str(tmp_path / "ssd"), "--ssd-bytes", "16MiB",
                       "--ssd-segment-bytes", "4MiB", "--ssd-io-threads", "2")
    rng = random.Random(16)
    with KVClient(socket=d.socket) as c:
        assert c.index_snapshot is not None
        ns = c.namespace("control-eq", LAYOUT)
        other = c.namespace("control-eq-other", LAYOUT)   # same tokens, other namespace
        chains = [ns.block_keys([rng.randrange(50000) for _ in range(16 * 40)]) for _ in range(12)]
        seen_tiers: set[str] = set()
        for step in range(80):
            keys = rng.choice(chains)
            op = rng.random()
            if op < 0.65:        # puts: 12 chains x 40 blocks overflow 256 DRAM slots
                n = rng.randrange(1, 41)
                ns.put(keys[:n], _kv(n, step % 250)).result()
            elif op < 0.8:
                lo = rng.randrange(0, 40)
                ns.delete(keys[lo:lo + rng.randrange(1, 6)])
            else:
                ns.get(keys[:rng.randrange(1, 41)]).result()   # promotions from SSD
            for k in chains:
                local, remote = _both(ns, k)
                assert local == remote, f"step {step}: local {local} != gRPC {remote}"
                seen_tiers.update(local[1])
                assert _both(other, k)[0] == (0, [])
        st = c.stats()
        assert st.tier("DRAM").demotions > 0 and st.tier("DRAM").promotions > 0
        assert {"DRAM", "SSD"} <= seen_tiers, seen_tiers   # demotions were mirrored


# -- torn reads -------------------------------------------------------------------------------

def _flipper(path_q, stop, arena_uuid: bytes, tmpdir: str):
    """Writer process: constant keys A, flickering keys B, never-stored keys C; frequent
    rebuilds (which move every key) and tier flips."""
    snap = shmindex.ShmIndex.create(f"{tmpdir}/fake.arena", arena_uuid, buckets=1024)
    rng = np.random.default_rng(7)
    a, b = _torn_keys()
    tag = shmindex.ns_tag(b"torn-namespace-0")
    for lo, hi in a.tolist():
        snap.put(tag, lo, hi, shmindex.DRAM)
    path_q.put(str(snap.path))      # readers start once A is in
    i = 0
    while not stop.is_set():
        i += 1
        snap.beat()                 # as the daemon does: readers trust a fresh snapshot only
        for lo, hi in b[rng.permutation(len(b))[:16]]:
            r = rng.random()
            if r < 0.4:
                snap.remove(tag, int(lo), int(hi))
            else:
                snap.put(tag, int(lo), int(hi), shmindex.DRAM if r < 0.7 else shmindex.SSD)
        if i % 20 == 0:   # a rebuild with A and a random half of B
            keep = b[rng.random(len(b)) < 0.5]
            allk = np.concatenate([a, keep]).astype(np.uint64)
            snap.rebuild(np.full(len(allk), tag, dtype=np.uint64), allk,
                         np.full(len(allk), shmindex.DRAM, dtype=np.uint8))
    snap.close()


def _torn_keys():
    rng = np.random.default_rng(3)
    k = rng.integers(0, 2**63, size=(400, 2), dtype=np.uint64)
    return k[:200], k[200:300]   # A, B; k[300:] is C (never stored)


def test_torn_reads_are_retried_never_used(tmp_path):
    ctx = mp.get_context("spawn")
    path_q, stop = ctx.Queue(), ctx.Event()
    uuid = b"0123456789abcdef"
    w = ctx.Process(target=_flipper, args=(path_q, stop, uuid, str(tmp_path)))
    w.start()
    try:
        snap = shmindex.ShmIndex.attach(path_q.get(timeout=60), uuid)
        a, b = _torn_keys()
        c = np.random.default_rng(3).integers(0, 2**63, size=(400, 2), dtype=np.uint64)[300:]
        tag = shmindex.ns_tag(b"torn-namespace-0")
        probes = answered = 0
        end = time.monotonic() + 4.0
        while time.monotonic() < end:
            for q, want in ((a, "A"), (b, "B"), (c, "C")):
                t = snap.probe(tag, np.ascontiguousarray(q))
                probes += 1
                if t is None:
                    continue   # torn too often: the caller would ask the daemon
                answered += 1
                if want == "A":
                    assert (t == shmindex.DRAM).all(), "a constant key was misread"
                elif want == "C":
                    assert (t == shmindex.EMPTY).all(), "a never-stored key was found"
                else:
                    assert np.isin(t, [shmindex.EMPTY, shmindex.DRAM, shmindex.SSD]).all()
        snap.close()
        assert answered > probes // 10 and probes > 50, (answered, probes)   # few fall back
    finally:
        stop.set()
        w.join(20)
        if w.is_alive():
            w.kill()


def test_snapshot_full_falls_back_and_recovers(tmp_path):
    snap = shmindex.ShmIndex.create(tmp_path / "x.arena", b"u" * 16, buckets=64)
    tag = shmindex.ns_tag(b"n" * 16)
    keys = np.arange(1, 101, dtype=np.uint64).reshape(-1, 2) * np.uint64(2654435761)
    try:
        for lo, hi in keys.tolist():
            snap.put(tag, lo, hi, shmindex.DRAM)
        assert snap.flags & shmindex.OVERFLOW and snap.probe(tag, keys) is None
        assert snap.rebuild(np.full(10, tag, dtype=np.uint64), keys[:10],
                            np.full(10, shmindex.SSD, dtype=np.uint8))
        t = snap.probe(tag, keys)
        assert (t[:10] == shmindex.SSD).all() and (t[10:] == shmindex.EMPTY).all()
    finally:
        snap.close()
    assert not snap.path.exists()


_POOL = np.random.default_rng(11).integers(0, 2**63, size=(40, 2), dtype=np.uint64)
_batch = st.lists(st.tuples(st.integers(0, 39), st.sampled_from(["DRAM", "SSD", "gone"]),
                            st.integers(0, 1 << 16)), max_size=24, unique_by=lambda t: t[0])


@settings(max_examples=60, deadline=None)
@given(st.lists(_batch, min_size=1, max_size=8))
def test_put_many_publishes_what_one_put_per_block_publishes(tmp_path_factory, batches):
    """ShmIndex.put_many (a promotion's, a demotion's, a commit's blocks at once) against put
    per block, on a table of 64 buckets: home-bucket collisions, tombstones (removals between
    batches) and the load limit (40 keys, 38 fit) all happen. Every key probes the same tier,
    offset and generation from both, and both agree on the live count and on overflowing (the
    buckets may differ: put_many places new blocks whose home bucket is empty first)."""
    d = tmp_path_factory.mktemp("putmany")
    a = shmindex.ShmIndex.create(d / "a.arena", b"u" * 16, buckets=64)
    b = shmindex.ShmIndex.create(d / "b.arena", b"u" * 16, buckets=64)
    tag = shmindex.ns_tag(b"n" * 16)
    try:
        for batch in batches:
            puts = [(i, t, o) for i, t, o in batch if t != "gone"]
            for i, t, _ in batch:
                if t == "gone":
                    a.remove(tag, *_POOL[i].tolist())
                    b.remove(tag, *_POOL[i].tolist())
            if puts:
                ids = np.array([i for i, _, _ in puts])
                tiers = np.array([shmindex.DRAM if t == "DRAM" else shmindex.SSD
                                  for _, t, _ in puts], dtype=np.uint8)
                offs = np.array([o * 4096 if t == "DRAM" else shmindex.NO_OFFSET
                                 for _, t, o in puts], dtype=np.int64)
                gens = np.array([o % 7 if t == "DRAM" else 0 for _, t, o in puts],
                                dtype=np.uint32)
                a.put_many(np.full(len(puts), tag, dtype=np.uint64), _POOL[ids], tiers, offs,
                           gens)
                for j, i in enumerate(ids.tolist()):
                    lo, hi = _POOL[i].tolist()
                    b.put(tag, lo, hi, int(tiers[j]), int(offs[j]), int(gens[j]))
            a.beat()
            b.beat()
            assert (a.live, a.flags) == (b.live, b.flags)
            got_a, got_b = a.probe_slots(tag, _POOL), b.probe_slots(tag, _POOL)
            assert (got_a is None) == (got_b is None) == bool(a.flags & shmindex.OVERFLOW)
            if got_a is not None:
                for x, y in zip(got_a, got_b):
                    assert x.tolist() == y.tolist()
    finally:
        a.close()
        b.close()


def test_a_stale_heartbeat_makes_readers_ask_the_daemon(tmp_path, monkeypatch):
    """A daemon alive but not answering (stopped, wedged) stops stamping the header: its
    snapshot is not used (the caller's RPC then times out and counts the fallback)."""
    snap = shmindex.ShmIndex.create(tmp_path / "x.arena", b"u" * 16, buckets=64)
    reader = shmindex.ShmIndex.attach(snap.path, b"u" * 16)
    tag = shmindex.ns_tag(b"n" * 16)
    keys = np.arange(1, 9, dtype=np.uint64).reshape(-1, 2)
    try:
        for lo, hi in keys.tolist():
            snap.put(tag, lo, hi, shmindex.DRAM)
        assert reader.fresh and (reader.probe(tag, keys) == shmindex.DRAM).all()
        now = time.monotonic_ns()
        monkeypatch.setattr(shmindex.time, "monotonic_ns",
                            lambda: now + int(2 * shmindex.STALE_S * 1e9))
        assert not reader.fresh and reader.probe(tag, keys) is None
        snap.beat()                 # the daemon answers again
        assert reader.fresh and (reader.probe(tag, keys) == shmindex.DRAM).all()
    finally:
        reader.close()
        snap.close()


def test_a_stopped_daemons_snapshot_is_not_used(daemon_factory):
    """SIGSTOP the daemon: a same-host lookup does not answer from its snapshot (it asks the
    daemon, which times out: the SDK raises Unavailable, which the adapters count as a
    fallback); after SIGCONT local answers resume."""
    d = daemon_factory("--dram-bytes", str(64 << 20))
    with KVClient(d.socket, timeout_s=1.5) as c:
        ns = c.namespace("stale", LAYOUT)
        keys = ns.block_keys(list(range(4 * LAYOUT.block_tokens)))
        ns.put(keys, _kv(len(keys), 7)).result()
        assert ns.lookup(keys).num_cached == len(keys)
        local0 = ns.local_lookups_answered
        d.proc.send_signal(signal.SIGSTOP)
        try:
            time.sleep(2 * shmindex.STALE_S)
            with pytest.raises(KVStoreError):
                ns.lookup(keys)
            assert ns.local_lookups_answered == local0
        finally:
            d.proc.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 10
        while ns.local_lookups_answered == local0:
            assert time.monotonic() < deadline, "local lookups did not resume"
            try:
                assert ns.lookup(keys).num_cached == len(keys)
            except KVStoreError:
                time.sleep(0.2)


# -- trust, restart ---------------------------------------------------------------------------

def test_untrusted_tenant_gets_no_snapshot_and_correct_lookups(daemon_factory, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("tenant-a-token-0123456789abcdef tenant-a\n"
                      "tenant-b-token-0123456789abcdef tenant-b\n")
    tokens.chmod(0o600)
    d = daemon_factory(*SMALL_DRAM, "--listen", "127.0.0.1:0", "--tokens-file", str(tokens),
                       "--arena-tenants", "tenant-a")
    addr = f"127.0.0.1:{tcp_port(d)}"
    with KVClient(address=addr, token="tenant-b-token-0123456789abcdef") as b, \
            KVClient(address=addr, token="tenant-a-token-0123456789abcdef") as a:
        assert b.index_snapshot is None and not b.shared_memory
        assert a.index_snapshot is not None   # trusted: offered the arena and the snapshot
        ns = b.namespace("control-tenant", LAYOUT, tenant="tenant-b")
        keys = ns.block_keys(list(range(16 * 8)))
        ns.put(keys[:5], _kv(5, 9)).result()
        r = ns.lookup(keys)
        assert (r.num_cached, r.tiers) == (5, ["DRAM"] * 5)
        assert ns.local_lookups_answered == 0
        ns.delete(keys[2:3])
        assert ns.lookup(keys).num_cached == 2 and ns.local_lookups_answered == 0


def test_daemon_restart_remaps_the_new_snapshot(daemon_factory, tmp_path):
    d = daemon_factory(*SMALL_DRAM, workdir=tmp_path / "d")
    with KVClient(socket=d.socket, timeout_s=10) as c:
        ns = c.namespace("control-restart", LAYOUT)
        keys = ns.block_keys(list(range(16 * 6)))
        ns.put(keys, _kv(6, 3)).result()
        assert ns.lookup(keys).num_cached == 6 and ns.local_lookups_answered == 1
        old_snapshot, old_uuid = c.index_snapshot, c.arena.uuid
        d.kill()
        d2 = daemon_factory(*SMALL_DRAM, workdir=tmp_path / "d")
        deadline = time.monotonic() + 20
        while True:   # the first lookups after the restart may meet the old session ending
            try:
                r = ns.lookup(keys)
                if c.reconnects:
                    break
            except Exception:
                pass
            assert time.monotonic() < deadline, "client did not reconnect"
            time.sleep(0.1)
        assert r.num_cached == 0          # the new daemon holds nothing yet
        # mapped anew: another object, the new arena's (its uuid), a file that exists
        assert c.index_snapshot is not None and c.index_snapshot is not old_snapshot
        assert c.arena.uuid != old_uuid and c.index_snapshot.path.exists()
        assert not old_snapshot.path.exists()   # the new daemon removed the killed one's
        ns.put(keys[:4], _kv(4, 5)).result()
        before = ns.local_lookups_answered
        assert ns.lookup(keys).num_cached == 4
        assert ns.local_lookups_answered == before + 1    # answered from the new snapshot
        d2.stop()
        assert not c.index_snapshot.path.exists()   # a clean stop removes its snapshot
        assert c.index_snapshot.flags & shmindex.CLOSED   # what mapped clients see
        before = ns.local_lookups_answered
        with pytest.raises(Unavailable):                    # no stale answer from it
            ns.lookup(keys)
        assert ns.local_lookups_answered == before


# -- bench ------------------------------------------------------------------------------------

def test_bench_control_smoke():
    r = subprocess.run([sys.executable, "-m", "kvstore", "bench", "control", "--clients", "1,2",
                        "--seconds", "0.5", "--keys", "16", "--stored", "12", "--get-blocks", "8",
                        "--json"],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr + r.stdout
    out = json.loads(r.stdout)
    assert out["wrong_answers"] == 0
    for n in ("1", "2"):
        p = out["points"][n]
        assert p["grpc"]["lookups"] > 0 and p["grpc"]["answered_locally"] == 0
        assert p["local"]["answered_locally"] == p["local"]["lookups"] > 0
        assert p["local"]["p99_ms"] > 0 and p["speedup"] > 0
    assert out["numpy_probe_1thread"]["lookups_per_s"] > 0
    assert "lookup_speedup_vs_grpc_16" not in out     # no 16-client point asked for
    # DRAM gets (default --ops lookup,get): every block compared with what was put
    assert out["get_blocks"] == 8
    for n in ("1", "2"):
        p = out["get_points"][n]
        for path in ("grpc", "local"):
            assert p[path]["gets"] > 0 and p[path]["wrong"] == 0
            assert p[path]["gb_per_s"] > 0
    assert "get_speedup_vs_grpc_16" not in out
    bad = subprocess.run([sys.executable, "-m", "kvstore", "bench", "control", "--clients", "0"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--clients" in bad.stderr
    for args in (["--ops", "scan"], ["--get-blocks", "13", "--stored", "12", "--keys", "16"]):
        bad = subprocess.run([sys.executable, "-m", "kvstore", "bench", "control", *args],
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and args[0] in bad.stderr, bad.stderr


def test_remote_tier_full_local_hits_stay_local_short_prefixes_ask_the_daemon(daemon_factory,
                                                                               tmp_path):
    from kvstore.bench.cluster_engines import skip_reason, start_engine
    from support.remote import LAYOUT as RL, MODEL, host, put_on, remote_row, wait_for
    reason = skip_reason("redis")
    if reason:
        pytest.skip(reason)
    engine = start_engine("redis", tmp_path / "engine")
    try:
        a = host(daemon_factory, tmp_path, "a", engine.url)
        # B does not fill on lookup: the remote blocks stay remote until a get reads them
        b = host(daemon_factory, tmp_path, "b", engine.url, "--remote-fill-on-lookup", "false")
        with KVClient(a.socket) as ca, KVClient(b.socket) as cb:
            _, keys, _ = put_on(ca, 5, 8)
            wait_for(lambda: remote_row(ca).bytes_in >= 8 * LAYOUT.block_bytes, what="writes")
            nsb = cb.namespace(MODEL, RL)
            assert cb.index_snapshot is not None and cb.index_snapshot.flags & shmindex.REMOTE
            # nothing local on B: the snapshot's answer is short, so the daemon is asked
            r = nsb.lookup(keys)
            assert (r.num_cached, set(r.tiers)) == (8, {"REMOTE"})
            assert nsb.local_lookups_answered == 0
            nsb.get(keys[:3]).result(timeout=30)          # 3 blocks now local on B
            assert nsb.lookup(keys[:3]).tiers == ["DRAM"] * 3   # a full local hit: no RPC
            assert nsb.local_lookups_answered == 1
            r = nsb.lookup(keys)                          # DRAM prefix, REMOTE rest: the RPC
            assert r.tiers == ["DRAM"] * 3 + ["REMOTE"] * 5 and nsb.local_lookups_answered == 1
    finally:
        engine.stop()


def test_index_mirror_through_tombstones_overflow_and_rebuilds(tmp_path):
    """In process, a 64-bucket snapshot: puts and deletes fill it past 60% (overflow: readers
    fall back), leave tombstones (rebuilds), and shrink back (it answers again) — whenever it
    answers, it answers what the store's own lookup does."""
    from kvstore.core.arena import Arena
    from kvstore.store.blockstore import dram_store
    arena = Arena.create(8 << 20, tmp_path)
    snap = shmindex.ShmIndex.create(arena.path, arena.uuid, buckets=64)
    reader = shmindex.ShmIndex.attach(snap.path, arena.uuid)
    try:
        store = dram_store(arena, chunk_bytes=1 << 20, snapshot=snap)
        sid = store.open_session().session_id
        ns = store.register_namespace("mirror", LAYOUT)
        tag = shmindex.ns_tag(ns.namespace_id)
        rng = random.Random(24)
        pool = [bytes(rng.getrandbits(8) for _ in range(16)) for _ in range(80)]
        answered = fell_back = 0
        for step in range(400):
            snap.beat()             # as the daemon does: readers trust a fresh snapshot only
            batch = rng.sample(pool, rng.randrange(1, 12))
            if rng.random() < 0.55:
                aid, _ = store.allocate(sid, ns.namespace_id, b"".join(batch))
                store.commit(sid, aid)
            else:
                store.delete(ns.namespace_id, b"".join(batch))
            probe = rng.sample(pool, 16)
            t = reader.probe(tag, b"".join(probe))
            if t is None:
                fell_back += 1
                assert reader.flags & shmindex.OVERFLOW
                continue
            answered += 1
            for k, tier in zip(probe, t.tolist()):
                n, tiers = store.lookup(ns.namespace_id, k)
                assert (tier != shmindex.EMPTY) == (n == 1), f"step {step}"
                if n:
                    assert shmindex.TIER_NAMES[tier] == tiers[0]
        assert answered > 50 and fell_back > 10, (answered, fell_back)
        assert reader.epoch >= 4, reader.epoch     # rebuilt (tombstones, back from full)
    finally:
        reader.close()
        snap.close()
        arena.close()


def test_the_mirror_publishes_hbm_copies_and_forgets_them_with_the_block(tmp_path):
    """In process: a block whose HBM copy the tier reports is published as tier HBM (what the
    daemon's Lookup answers) with its DRAM slot, goes back to DRAM when the copy goes, keeps
    tier HBM through a rebuild, and leaves the snapshot for good when it is freed — even
    though the HBM tier reports the copy's removal only after the unlink."""
    from types import SimpleNamespace
    from kvstore.store.table import BlockTable
    from kvstore.tiers.base import NO_SLOT

    snap = shmindex.ShmIndex.create(tmp_path / "x.arena", b"u" * 16, buckets=64, hbm=True)
    reader = shmindex.ShmIndex.attach(snap.path, b"u" * 16)
    table = None

    def on_free(bid):       # the HBM tier's forget, as the daemon wires it
        table.report_copy("GPU", bid, stored=False)

    table = BlockTable(mirror=snap, on_free=on_free)
    try:
        ns = SimpleNamespace(index=0, namespace_id=b"n" * 16)
        table.add_namespace(ns)
        tag = shmindex.ns_tag(ns.namespace_id)
        keys = [bytes([i]) * 16 for i in range(1, 4)]
        bids = [table.add(0, k, -1, 1, dram=4096 * (i + 1)) for i, k in enumerate(keys)]
        table.publish(bids)
        table.set_dram(bids[2], NO_SLOT)          # the third one on SSD only
        table.ssd[bids[2]] = 7
        snap.beat()
        probe = lambda: reader.probe(tag, b"".join(keys)).tolist()  # noqa: E731
        assert probe() == [shmindex.DRAM, shmindex.DRAM, shmindex.SSD]
        table.report_copy("GPU", bids[0], stored=True)
        table.report_copy("GPU", bids[2], stored=True)
        assert probe() == [shmindex.HBM, shmindex.DRAM, shmindex.HBM]
        table.resync_mirror()
        assert probe() == [shmindex.HBM, shmindex.DRAM, shmindex.HBM]
        table.report_copy("GPU", bids[2], stored=False)
        assert probe() == [shmindex.HBM, shmindex.DRAM, shmindex.SSD]
        assert table.discard(bids[0])              # freed now: unlink, then the tiers forget
        assert probe() == [shmindex.EMPTY, shmindex.DRAM, shmindex.SSD]
        assert table.gpu[bids[0]] == 0
    finally:
        reader.close()
        snap.close()
