"""Lease-free same-host gets (client/namespace.py _get_local, docs/decisions.md): DRAM blocks read
straight from the arena at the slots the index snapshot publishes, proven by slot generations,
with no RPC on the get's path; what the daemon must still learn (LRU stamps, hit counts, DRAM
get counters) arrives through ReportReads. Real daemon and reader processes throughout."""
from __future__ import annotations

import json
import multiprocessing as mp
import signal
import time

import grpc
import numpy as np
import pytest

from kvstore.client import KVClient
from kvstore.core import shmindex
from kvstore.core.errors import InvalidArgument
from kvstore.core.slotgen import SlotGenerations
from kvstore.store.blockstore import dram_store
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc
from support.ssd import LAYOUT, SMALL_DRAM, chain, get_exact, put_chain, ssd_args, ssd_stats, tier
from support.readerproc import LAYOUT as RL, block_for
from support.readers import churn, drain, start_reader

# as tests/store/test_reads.py: 48 reader blocks of 512 KiB in a 64-slot DRAM tier
N = 48
DAEMON_ARGS = ("--dram-bytes", "36MiB", "--chunk-bytes", "4MiB",
               "--max-inflight-bytes-per-client", "256MiB")


def _dram(c: KVClient):
    return c.stats().tier("DRAM")


def test_lease_free_get_is_byte_exact_and_needs_no_daemon(daemon_factory):
    """The daemon SIGSTOPped (its heartbeat still fresh): a DRAM get still answers at once with
    the exact bytes — no RPC was on its path. The read is accounted after SIGCONT."""
    d = daemon_factory(*SMALL_DRAM)
    with KVClient(d.socket, timeout_s=20) as c:
        ns = c.namespace("lf", LAYOUT)
        keys, data = put_chain(ns, 1, 12)
        extra = ns.block_keys(np.arange(16 * 16) + 7)[12:16]       # never stored: misses
        out = np.zeros((16, *LAYOUT.block_shape), dtype=np.uint8)
        for attempt in range(5):     # a loaded box may leave the heartbeat stale: retry
            time.sleep(0.15)
            d.proc.send_signal(signal.SIGSTOP)
            try:
                t0 = time.monotonic()
                got = ns.get(keys, out=out).result(timeout=30)
                took = time.monotonic() - t0
            finally:
                d.proc.send_signal(signal.SIGCONT)
            if took < shmindex.STALE_S:
                break
        assert took < shmindex.STALE_S, f"the get waited {took:.2f}s for the stopped daemon"
        assert ns.local_gets_answered >= 1
        assert len(got) == 12 and np.array_equal(got, data)
        # a partial hit answered locally: DRAM prefix, then a snapshot miss (no remote tier)
        before = ns.local_gets_answered
        mixed = ns.get(keys[:4] + extra).result(timeout=30)
        assert ns.local_gets_answered == before + 1
        assert len(mixed) == 4 and np.array_equal(np.asarray(mixed), data[:4])
        st = c.stats()
        assert st.active_leases == 0 and st.reads_reported >= 16


def test_lease_free_gets_are_accounted_as_acquires_are(daemon_factory):
    """The same get, lease-free and over Acquire, moves the daemon's counters alike (hits,
    misses, bytes out, one get latency sample); only ReportReads counts the first."""
    d = daemon_factory(*SMALL_DRAM)
    with KVClient(d.socket) as c:
        ns = c.namespace("acct", LAYOUT)
        keys, data = put_chain(ns, 2, 8)
        more = ns.block_keys(np.concatenate([chain(2, 8)[0], np.arange(64)]))   # 4 misses
        assert more[:8] == keys

        def delta(local: bool):
            ns.local_gets = local
            s0 = c.stats()
            got = ns.get(more).result(timeout=30)
            s1 = c.stats()
            assert np.array_equal(np.asarray(got), data)
            d0, d1 = s0.tier("DRAM"), s1.tier("DRAM")
            return ((d1.hits - d0.hits, d1.misses - d0.misses, d1.bytes_out - d0.bytes_out,
                     d1.get_latency.count - d0.get_latency.count),
                    s1.reads_reported - s0.reads_reported)
        n0 = ns.local_gets_answered
        lease_free, reported = delta(True)
        assert ns.local_gets_answered == n0 + 1 and reported == 8
        leased, reported = delta(False)
        assert ns.local_gets_answered == n0 + 1 and reported == 0
        assert lease_free == leased == (8, 4, 8 * LAYOUT.block_bytes, 1)


def test_lease_free_reads_keep_lru_order(daemon_factory):
    """Eviction picks the least recently read blocks: a chain read lease-free survives the
    put that evicts, the one written after it but not read does not."""
    d = daemon_factory(*SMALL_DRAM)
    with KVClient(d.socket) as c:
        ns = c.namespace("lru", LAYOUT)
        old, old_data = put_chain(ns, 10, 100)
        mid, _ = put_chain(ns, 11, 100)
        n0 = ns.local_gets_answered
        assert get_exact(ns, old, old_data) == 100
        assert ns.local_gets_answered == n0 + 1
        put_chain(ns, 12, 120)                       # 320 blocks in ~256 slots: evicts
        assert ns.lookup(old).num_cached == 100, "a chain just read was evicted first"
        assert ns.lookup(mid).num_cached < 100
        assert get_exact(ns, old, old_data) == 100


def test_lease_free_reads_count_hits_for_write_through_selective(daemon_factory, tmp_path):
    """A block read ssd_write_hits times by lease-free gets reaches SSD, as with leases."""
    d = daemon_factory(*ssd_args(tmp_path / "ssd", "32MiB", "--ssd-write-policy",
                                 "write_through_selective", "--ssd-write-hits", "3"))
    with KVClient(d.socket) as c:
        ns = c.namespace("sel", LAYOUT)
        keys, data = put_chain(ns, 20, 6)
        n0 = ns.local_gets_answered
        for _ in range(2):
            assert get_exact(ns, keys, data) == 6
        assert tier(ssd_stats(c), "SSD").blocks == 0          # two reads: below the threshold
        assert get_exact(ns, keys, data) == 6
        assert ns.local_gets_answered == n0 + 3              # every read was lease-free
        deadline = time.monotonic() + 10
        while tier(ssd_stats(c), "SSD").blocks < 6:
            assert time.monotonic() < deadline, "blocks read 3 times never reached SSD"
            time.sleep(0.02)


def test_ssd_blocks_no_snapshot_and_local_gets_off_give_the_same_results(daemon_factory,
                                                                          tmp_path):
    """A prefix that is DRAM then SSD: the DRAM part is read lease-free, the SSD part through
    Acquire (promoted) into the rest of out — same bytes as an all-RPC get, a streaming
    client's get, with out given or not."""
    d = daemon_factory(*ssd_args(tmp_path / "ssd", "32MiB"))
    with KVClient(d.socket) as c, KVClient(d.socket, shared_memory=False) as remote:
        ns = c.namespace("mix", LAYOUT)
        keys, data = put_chain(ns, 30, 40)
        for seed in range(8):                         # 320 newer blocks: the chain is demoted
            put_chain(ns, 300 + seed, 40)
        assert ns.lookup(keys).tiers == ["SSD"] * 40
        n0 = ns.local_gets_answered
        assert get_exact(ns, keys[:10], data[:10]) == 10    # no DRAM prefix: Acquire, promoted
        assert ns.local_gets_answered == n0
        k = 10
        assert ns.lookup(keys).tiers == ["DRAM"] * k + ["SSD"] * (40 - k)
        snap = c.index_snapshot
        t, offs, _ = snap.probe_slots(shmindex.ns_tag(ns.namespace_id), b"".join(keys))
        assert shmindex.dram_prefix(t, offs) == k and (offs[k:] == shmindex.NO_OFFSET).all()
        n0 = ns.local_gets_answered
        got = ns.get(keys).result(timeout=60)         # out=None: a new output
        assert ns.local_gets_answered == n0           # not complete locally
        assert len(got) == 40 and np.array_equal(np.asarray(got), data)
        assert get_exact(ns, keys, data) == 40        # out given; now all DRAM: lease-free
        assert ns.local_gets_answered == n0 + 1
        ns.local_gets = False
        assert get_exact(ns, keys, data) == 40
        assert ns.local_gets_answered == n0 + 1
        rns = remote.namespace("mix", LAYOUT)        # no arena, no snapshot: streamed
        assert remote.index_snapshot is None
        assert get_exact(rns, keys, data) == 40 and rns.local_gets_answered == 0


# -- racing evictions and overwrites -----------------------------------------------------------

def test_lease_free_get_racing_slot_reuse_never_returns_other_bytes(daemon_factory):
    """The reader reads lease-free (it holds no lease: nothing protects its slots). Rounds of:
    reader SIGSTOPped at a random moment (often mid-copy) → its blocks evicted and their slots
    written with other keys' bytes → reader resumes. Every block it returns is its own."""
    d = daemon_factory(*DAEMON_ARGS)
    rng = np.random.default_rng(12)
    every: list[dict] = []
    with KVClient(d.socket) as c:
        ns = c.namespace("reads", RL)
        p, lines = start_reader(d.socket, N, lease_free=True)
        keys = ns.block_keys(list(range(16 * N)))
        want = np.stack([block_for(k, 0) for k in keys])
        try:
            for round_no in range(1, 7):
                time.sleep(float(rng.uniform(0.0, 0.05)))
                p.send_signal(signal.SIGSTOP)
                every += drain(lines)
                churned = churn(c, round_no)        # evicts and overwrites the reader's slots
                p.send_signal(signal.SIGCONT)
                every.append(json.loads(lines.get(timeout=60)))
                ns.delete(churned)
                ns.put(keys, want).result(timeout=60)    # the reader's blocks come back
                deadline = time.monotonic() + 30
                while True:                           # ... and are read lease-free again
                    r = json.loads(lines.get(timeout=60))
                    every.append(r)
                    if r["n"] == N:
                        break
                    assert time.monotonic() < deadline, every[-5:]
        finally:
            p.send_signal(signal.SIGCONT)
            p.kill()
            p.wait()
    assert every and all(r["bad"] == 0 and not r["error"] for r in every), \
        [r for r in every if r["bad"] or r["error"]][:5]
    assert max(r["local"] for r in every) > 0, "no get was answered lease-free"
    assert any(r["n"] < N for r in every), "no get ever saw its blocks reused"


def test_read_local_views_the_arena_and_proves_after_the_read(daemon_factory, tmp_path):
    """Namespace.read_local (the vLLM connector's synchronous load): views of the DRAM prefix's
    slots, no copy and no RPC; verify() proves the blocks after the caller read them (and
    reports the reads), and proves none whose slot was reused meanwhile. Empty where the
    first block is not in DRAM, or for a client not trusted with the arena."""
    d = daemon_factory(*ssd_args(tmp_path / "ssd"))
    with KVClient(d.socket, timeout_s=20) as c:
        ns = c.namespace("views", LAYOUT)
        keys, data = put_chain(ns, 3, 8)
        extra = ns.block_keys(np.arange(16 * 16) + 11)[8:12]      # never stored
        reported0 = c.stats().reads_reported
        r = ns.read_local(keys + extra)
        assert len(r) == 8
        rows = np.concatenate([np.asarray(v) for _, _, v in r.runs])
        assert [f for f, _, _ in r.runs] == np.cumsum([0] + [n for _, n, _ in r.runs])[:-1].tolist()
        assert np.array_equal(rows, data.reshape(8, -1))
        assert r.verify() == 8 and r.verify() == 8                  # idempotent
        assert c.stats().reads_reported - reported0 == 8
        r = ns.read_local(keys)                                     # a report left for later
        assert r.verify(report=False) == 8
        assert c.stats().reads_reported - reported0 == 8
        r.report()
        r.report()
        assert c.stats().reads_reported - reported0 == 16
        # every slot reused under a read (256 blocks through a 256-slot DRAM tier; the old
        # blocks are demoted to SSD): nothing of it is proven
        r = ns.read_local(keys)
        for seed in range(4, 12):            # in puts of 32 blocks: the per-client I/O bound
            put_chain(ns, seed, 32)
        assert len(r) == 8 and r.verify() == 0
        assert ns.lookup(keys[:1]).tiers == ["SSD"]
        assert len(ns.read_local(keys)) == 0                        # first block not in DRAM
    with KVClient(d.socket, shared_memory=False) as c:              # no arena mapped
        ns = c.namespace("views", LAYOUT)
        assert len(ns.read_local(keys)) == 0 and ns.read_local(keys).verify() == 0


def _slot_flipper(path_q, stop, arena_uuid: bytes, tmpdir: str):
    """Writer process: keys whose bucket flips between (DRAM, offset o, generation g(o)) for
    ever-changing o and (SSD, no offset, 0), one by one and in batches (put_many), removals,
    and rebuilds that move every key."""
    snap = shmindex.ShmIndex.create(f"{tmpdir}/fake.arena", arena_uuid, buckets=1024)
    rng = np.random.default_rng(5)
    keys = _slot_keys()
    tag = shmindex.ns_tag(b"slot-namespace-0")
    path_q.put(str(snap.path))
    i = 0
    while not stop.is_set():
        i += 1
        snap.beat()
        picked = keys[rng.permutation(len(keys))[:16]]
        if i % 2:     # one batch, as a promotion, a demotion or a commit publishes its blocks
            dram = rng.random(len(picked)) < 0.6
            offs = np.where(dram, rng.integers(0, 1 << 20, len(picked)) * 4096,
                            shmindex.NO_OFFSET).astype(np.int64)
            gens = np.array([_gen_of(int(o)) if d else 0 for o, d in zip(offs, dram)],
                            dtype=np.uint32)
            snap.put_many(np.full(len(picked), tag, dtype=np.uint64), picked,
                          np.where(dram, shmindex.DRAM, shmindex.SSD).astype(np.uint8), offs,
                          gens)
            picked = picked[:0]
        for lo, hi in picked.tolist():
            r = rng.random()
            off = int(rng.integers(0, 1 << 20)) * 4096
            if r < 0.2:
                snap.remove(tag, lo, hi)
            elif r < 0.7:
                snap.put(tag, lo, hi, shmindex.DRAM, off, _gen_of(off))
            else:
                snap.put(tag, lo, hi, shmindex.SSD)
        if i % 25 == 0:
            keep = keys[rng.random(len(keys)) < 0.6]
            offs = rng.integers(0, 1 << 20, len(keep)).astype(np.int64) * 4096
            snap.rebuild(np.full(len(keep), tag, dtype=np.uint64), keep,
                         np.full(len(keep), shmindex.DRAM, dtype=np.uint8), offs,
                         np.array([_gen_of(int(o)) for o in offs], dtype=np.uint32))
    snap.close()


def _gen_of(off: int) -> int:
    return (off // 4096 * 2654435761 + 17) & 0xFFFFFFFF


def _slot_keys():
    return np.random.default_rng(9).integers(0, 2**63, size=(120, 2), dtype=np.uint64)


def test_probe_slots_never_pairs_a_tier_offset_and_generation_of_different_writes(tmp_path):
    """Torn-read check of the new columns: every answer is one the writer wrote whole (a DRAM
    offset with its own generation; SSD and misses with no offset), or None."""
    ctx = mp.get_context("spawn")
    path_q, stop = ctx.Queue(), ctx.Event()
    uuid = b"fedcba9876543210"
    w = ctx.Process(target=_slot_flipper, args=(path_q, stop, uuid, str(tmp_path)))
    w.start()
    try:
        snap = shmindex.ShmIndex.attach(path_q.get(timeout=60), uuid)
        keys = np.ascontiguousarray(_slot_keys())
        tag = shmindex.ns_tag(b"slot-namespace-0")
        probes = answered = dram = 0
        end = time.monotonic() + 3.0
        while time.monotonic() < end:
            got = snap.probe_slots(tag, keys)
            probes += 1
            if got is None:
                continue
            answered += 1
            t, offs, gens = got
            is_dram = t == shmindex.DRAM
            dram += int(is_dram.sum())
            assert (offs[~is_dram] == shmindex.NO_OFFSET).all() and (gens[~is_dram] == 0).all()
            want = ((offs[is_dram] // 4096 * 2654435761 + 17) & 0xFFFFFFFF).astype(np.uint32)
            assert (offs[is_dram] >= 0).all() and (gens[is_dram] == want).all(), \
                "an offset was paired with another write's generation"
        snap.close()
        assert answered > probes // 10 and probes > 20 and dram > 0, (answered, probes, dram)
    finally:
        stop.set()
        w.join(20)
        if w.is_alive():
            w.kill()


# -- the daemon's side --------------------------------------------------------------------------

def test_commit_publishes_slot_and_generation_and_keep_drops_unverified_blocks(tmp_path):
    """In-process store: a commit publishes each block's slot with the slot's generation; a
    commit with keep=[...] never publishes the dropped blocks (a remote fill's failures) and
    frees their slots; a demotion republishes the block without a slot."""
    from kvstore.core.arena import Arena
    from kvstore.core.layout import KVLayout
    arena = Arena.create(16 << 20, tmp_path)
    gens = SlotGenerations.create(arena.path, arena.uuid, arena.size_bytes)
    snap = shmindex.ShmIndex.create(arena.path, arena.uuid, buckets=1024)
    try:
        store = dram_store(arena, chunk_bytes=1 << 20, generations=gens, snapshot=snap)
        s = store.open_session()
        layout = KVLayout(2, 4, 64, block_tokens=16, dtype="uint8")
        ns = store.register_namespace("keep", layout)
        keys = [bytes([i]) * 16 for i in range(1, 5)]
        blob = b"".join(keys)
        aid, offsets = store.allocate(s.session_id, ns.namespace_id, blob)
        used = store.dram.used_bytes()
        assert store.commit(s.session_id, aid, keep=[True, False, True, True]) == 3
        assert store.dram.used_bytes() == used - layout.slot_bytes   # the dropped slot is free
        t, offs, g = snap.probe_slots(shmindex.ns_tag(ns.namespace_id), blob)
        assert t.tolist() == [shmindex.DRAM, shmindex.EMPTY, shmindex.DRAM, shmindex.DRAM]
        assert offs.tolist() == [offsets[0], shmindex.NO_OFFSET, offsets[2], offsets[3]]
        assert g.tolist() == [gens.at(offsets[0]), 0, gens.at(offsets[2]), gens.at(offsets[3])]
        assert store.lookup(ns.namespace_id, blob)[0] == 1
        aid2, _ = store.allocate(s.session_id, ns.namespace_id, keys[1])
        with pytest.raises(InvalidArgument, match="keep has 2 flags for 1"):
            store.commit(s.session_id, aid2, keep=[True, False])
        store.commit(s.session_id, aid2, abort=True)     # still open after the refusal
        # report_reads: stamps and hit counts like an acquire's, no pin; unknown keys skipped
        bids = store.report_reads(ns.namespace_id, blob + b"\x77" * 16, misses=2)
        assert len(bids) == 3 and store.active_leases() == 0
        assert store.table.hits[bids].tolist() == [1, 1, 1]
        assert (store.dram.counters.hits, store.dram.counters.misses) == (3, 2)
        assert store.counters.reads_reported == 5
        # a rebuild keeps the columns
        store.table.resync_mirror()
        assert snap.probe_slots(shmindex.ns_tag(ns.namespace_id), blob)[2].tolist() == g.tolist()
    finally:
        snap.close()
        gens.close()
        arena.close()


def test_report_reads_bad_input_is_a_clear_error(daemon_factory):
    d = daemon_factory(*SMALL_DRAM)
    with KVClient(d.socket) as c:
        ns = c.namespace("rr", LAYOUT)
        keys, _ = put_chain(ns, 40, 2)
        with grpc.insecure_channel(f"unix:{d.socket}") as ch:
            stub = pb_grpc.KVStoreStub(ch)
            ok = stub.ReportReads(pb.ReportReadsRequest(
                namespace_id=ns.namespace_id, keys=b"".join(keys) + b"\x01" * 16), timeout=10)
            assert ok.counted == 2                   # the unknown key is skipped, no error
            for req, code, words in [
                (pb.ReportReadsRequest(namespace_id=b"\x05" * 16, keys=keys[0]),
                 grpc.StatusCode.NOT_FOUND, "unknown namespace"),
                (pb.ReportReadsRequest(namespace_id=ns.namespace_id, keys=b"\x01" * 15),
                 grpc.StatusCode.INVALID_ARGUMENT, "16"),
                (pb.ReportReadsRequest(namespace_id=ns.namespace_id, keys=keys[0],
                                       misses=1 << 30),
                 grpc.StatusCode.INVALID_ARGUMENT, "misses"),
                (pb.ReportReadsRequest(namespace_id=ns.namespace_id, keys=keys[0],
                                       get_s=[-1.0]),
                 grpc.StatusCode.INVALID_ARGUMENT, "get_s"),
            ]:
                with pytest.raises(grpc.RpcError) as exc:
                    stub.ReportReads(req, timeout=10)
                assert exc.value.code() == code and words in exc.value.details(), \
                    exc.value.details()
        assert _dram(c).hits == 2                    # and the daemon serves on
        assert ns.lookup(keys).num_cached == 2


def test_report_reads_only_from_clients_trusted_with_the_arena(daemon_factory, tmp_path):
    """A tenant not in arena_tenants reads nothing lease-free: its ReportReads is refused
    (PERMISSION_DENIED, ARENA_NOT_TRUSTED), so it cannot move eviction order or write
    policies; a trusted tenant's is taken."""
    from support.net import tcp_port
    tokens = tmp_path / "tokens"
    tokens.write_text("tenant-a-token-0123456789abcdef tenant-a\n"
                      "tenant-b-token-0123456789abcdef tenant-b\n")
    tokens.chmod(0o600)
    d = daemon_factory(*SMALL_DRAM, "--listen", "127.0.0.1:0", "--tokens-file", str(tokens),
                       "--arena-tenants", "tenant-a")
    address = f"127.0.0.1:{tcp_port(d)}"
    for who, trusted in (("a", True), ("b", False)):
        token = f"tenant-{who}-token-0123456789abcdef"
        with KVClient(address=address, token=token, shared_memory=False) as c:
            ns = c.namespace("trust", LAYOUT, tenant=f"tenant-{who}")
            keys, _ = put_chain(ns, 50, 2)
            with grpc.insecure_channel(address) as ch:
                call = pb_grpc.KVStoreStub(ch).ReportReads
                req = pb.ReportReadsRequest(namespace_id=ns.namespace_id, keys=b"".join(keys))
                md = (("authorization", f"Bearer {token}"),)
                if trusted:
                    assert call(req, metadata=md, timeout=10).counted == 2
                else:
                    with pytest.raises(grpc.RpcError) as exc:
                        call(req, metadata=md, timeout=10)
                    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
                    assert "not trusted with the shared arena" in exc.value.details()


def test_quantized_namespace_reads_lease_free_through_its_staging(daemon_factory):
    """A quantized namespace's get reads its packed rows lease-free into the staging buffer
    and dequantizes them: the same values as the leased path, into out or a new tensor."""
    torch = pytest.importorskip("torch")
    from kvstore.core.layout import KVLayout
    layout = KVLayout(2, 2, 64, block_tokens=16, dtype="bfloat16", quant="int8")
    d = daemon_factory(*SMALL_DRAM)
    with KVClient(d.socket) as c:
        ns = c.namespace("quant-lf", layout)
        keys = ns.block_keys(list(range(16 * 6)))
        kv = torch.randn((6, *layout.block_shape), generator=torch.Generator().manual_seed(3))
        assert ns.put(keys, kv.to(torch.bfloat16)).result(timeout=30) == 6
        n0 = ns.local_gets_answered
        lease_free = ns.get(keys).result(timeout=30)
        out = torch.empty((6, *layout.block_shape), dtype=torch.bfloat16)
        into_out = ns.get(keys, out=out).result(timeout=30)
        assert ns.local_gets_answered == n0 + 2
        ns.local_gets = False
        leased = ns.get(keys).result(timeout=30)
        assert ns.local_gets_answered == n0 + 2
        assert lease_free.shape == leased.shape == (6, *layout.block_shape)
        assert torch.equal(lease_free, leased) and torch.equal(into_out, leased)
        assert float((leased.float() - kv).abs().max()) < 0.1     # dequantized, not garbage
