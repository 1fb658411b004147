"""The cluster tier with real engines: two daemons ("host A", "host B": separate sockets, arenas
and SSD dirs) sharing one Mooncake master, and separately one 3-master Redis Cluster. Every
block served is compared byte for byte with what was written on the other host."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest

from kvstore.client import KVClient
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.tiers.remote.codec import encode_header, remote_key
from kvstore.bench.cluster_engines import RawClient, skip_reason, start_engine
from support.remote import DEADLINE_S, LAYOUT, MODEL, chain, host, put_on, remote_row, wait_for

BACKENDS = ["mooncake", "redis"]


@pytest.fixture(params=BACKENDS)
def engine(request, tmp_path):
    reason = skip_reason(request.param)
    if reason:
        pytest.skip(reason)
    e = start_engine(request.param, tmp_path / "engine")
    e.backend = request.param
    yield e
    e.stop()


def get_exact(ns, keys, data) -> int:
    out = np.empty((len(keys), *LAYOUT.block_shape), dtype=np.uint8)
    got = np.asarray(ns.get(keys, out=out).result(timeout=30))
    assert np.array_equal(got, data[:len(got)]), "served bytes differ from what host A wrote"
    return len(got)


def test_blocks_put_on_a_are_served_byte_exact_by_b(engine, daemon_factory, tmp_path):
    a = host(daemon_factory, tmp_path, "a", engine.url)
    b = host(daemon_factory, tmp_path, "b", engine.url)
    with KVClient(a.socket) as ca, KVClient(b.socket) as cb:
        _, keys, data = put_on(ca, 1, 12)
        wait_for(lambda: remote_row(ca).bytes_in >= 12 * LAYOUT.block_bytes, what="A's writes")
        nsb = cb.namespace(MODEL, LAYOUT)
        r = nsb.lookup(keys)
        assert r.num_cached == 12 and set(r.tiers) == {"REMOTE"}, r
        assert get_exact(nsb, keys, data) == 12
        row = remote_row(cb)
        assert row.hits == 12 and row.bytes_out == 12 * LAYOUT.block_bytes
        assert row.circuit_state == "closed" and row.backend == engine.url
        # now local on B: served from DRAM without the remote
        assert set(nsb.lookup(keys).tiers) == {"DRAM"}
        assert get_exact(nsb, keys, data) == 12 and remote_row(cb).hits == 12
        # a partial prefix: local blocks first, the rest continues remotely
        _, keys2, data2 = put_on(ca, 2, 6)
        wait_for(lambda: remote_row(ca).bytes_in >= 18 * LAYOUT.block_bytes, what="A's writes")
        assert get_exact(nsb, keys2[:2], data2[:2]) == 2
        assert nsb.lookup(keys2).tiers == ["DRAM"] * 2 + ["REMOTE"] * 4
        assert get_exact(nsb, keys2, data2) == 6


def test_a_block_another_host_stored_is_not_sent_again(engine, daemon_factory, tmp_path):
    """Content addressing, and the REMOTE row in `kvstore stats` and Prometheus."""
    from kvstore.bench.cluster_engines import free_port
    a = host(daemon_factory, tmp_path, "a", engine.url)
    port = free_port()
    b = host(daemon_factory, tmp_path, "b", engine.url, "--metrics-port", str(port))
    with KVClient(a.socket) as ca, KVClient(b.socket) as cb:
        put_on(ca, 3, 8)
        wait_for(lambda: remote_row(ca).bytes_in >= 8 * LAYOUT.block_bytes, what="A's writes")
        assert remote_row(ca).writes_deduplicated == 0
        put_on(cb, 3, 8)        # the same prefix computed again on B
        wait_for(lambda: remote_row(cb).writes_deduplicated == 8, what="B's existence check")
        assert remote_row(cb).bytes_in == 0
    r = subprocess.run([sys.executable, "-m", "kvstore", "stats", "--socket", b.socket],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "REMOTE" in r.stdout and "circuit closed" in r.stdout and engine.url in r.stdout
    r = subprocess.run([sys.executable, "-m", "kvstore", "stats", "--socket", b.socket, "--json"],
                       capture_output=True, text=True, timeout=30)
    row = {t["tier"]: t for t in json.loads(r.stdout)["tiers"]}["REMOTE"]
    assert row["writes_deduplicated"] == 8 and row["circuit_state"] == "closed"
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert "kvstore_remote_writes_deduplicated_total 8.0" in text
    assert 'kvstore_remote_circuit{state="closed"} 1.0' in text
    assert 'kvstore_tier_hits_total{tier="REMOTE"}' in text


def test_prefetch_planner_and_selective_writes(engine, daemon_factory, tmp_path):
    from kvstore.planner.recompute import PrefillProfile
    a = host(daemon_factory, tmp_path, "a", engine.url, "--remote-write-policy",
             "write_through_selective", "--remote-write-hits", "1")
    b = host(daemon_factory, tmp_path, "b", engine.url)
    with KVClient(a.socket) as ca, KVClient(b.socket) as cb:
        ns, keys, data = put_on(ca, 5, 8)
        time.sleep(0.5)
        assert remote_row(ca).bytes_in == 0          # selective: nothing read yet, nothing sent
        assert get_exact(ns, keys[:4], data[:4]) == 4
        wait_for(lambda: remote_row(ca).bytes_in == 4 * LAYOUT.block_bytes, what="read blocks")
        nsb = cb.namespace(MODEL, LAYOUT)
        plan = nsb.plan_recompute(keys, PrefillProfile(0.0, 1e-3, 0.0))
        assert plan.num_cached == 4 and set(plan.tiers) == {"REMOTE"}
        assert plan.bandwidth_bps["REMOTE"] > 0
        nsb.prefetch(keys, deadline_s=5.0)            # brings the remote blocks into B's DRAM
        wait_for(lambda: nsb.lookup(keys).tiers == ["DRAM"] * 4, 10, "prefetched blocks")
        assert remote_row(cb).hits == 4
        assert get_exact(nsb, keys, data) == 4 and remote_row(cb).hits == 4


def _nice_by_thread(pid: int) -> dict[int, int]:
    """Each thread's nice value (field 19 of /proc/PID/task/TID/stat)."""
    import os
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = open(f"/proc/{pid}/task/{tid}/stat").read()
        except OSError:
            continue        # the thread ended meanwhile
        out[int(tid)] = int(stat.rsplit(")", 1)[1].split()[16])
    return out


def test_only_the_fill_read_threads_run_at_a_lower_priority(engine, daemon_factory, tmp_path):
    """Mooncake's batch reads busy-poll for completion: the daemon runs that loop at a lower
    CPU priority (kvstore.tiers.remote.mooncake.READ_THREAD_NICE) on the fills' read threads
    only, never on the event loop or the engine's transfer workers, which move the bytes."""
    if engine.backend != "mooncake":
        pytest.skip("the busy-polling read is Mooncake's")
    from kvstore.tiers.remote.engine import READ_THREADS
    from kvstore.tiers.remote.mooncake import READ_THREAD_NICE
    a = host(daemon_factory, tmp_path, "a", engine.url)
    b = host(daemon_factory, tmp_path, "b", engine.url)
    with KVClient(a.socket) as ca, KVClient(b.socket) as cb:
        _, keys, data = put_on(ca, 50, 8)
        wait_for(lambda: remote_row(ca).bytes_in >= 8 * LAYOUT.block_bytes, what="A's writes")
        before = _nice_by_thread(b.proc.pid)
        assert set(before.values()) == {0}         # nothing lowered before B read anything
        assert get_exact(cb.namespace(MODEL, LAYOUT), keys, data) == 8
        after = _nice_by_thread(b.proc.pid)
    lowered = [t for t, n in after.items() if n == READ_THREAD_NICE]
    assert 1 <= len(lowered) <= READ_THREADS, after
    assert after[b.proc.pid] == 0                   # the event loop's thread
    assert all(n in (0, READ_THREAD_NICE) for n in after.values()), after
    # the read threads start with the first fill: every thread there before keeps its priority
    assert all(after[t] == 0 for t in before if t in after), after


def _worst_lookup_s(socket: str, namespace_id: bytes, keys_blob: bytes, stop) -> float:
    """Lookups of local blocks, back to back until ``stop``: the longest one."""
    import grpc
    from kvstore.v1 import kvstore_pb2_grpc as pb_grpc
    worst, n = 0.0, 0
    with grpc.insecure_channel(f"unix://{socket}") as ch:
        stub = pb_grpc.KVStoreStub(ch)
        while not stop.is_set() or n < 10:
            t0 = time.monotonic()
            stub.Lookup(pb.LookupRequest(namespace_id=namespace_id, keys=keys_blob), timeout=30)
            worst = max(worst, time.monotonic() - t0)
            n += 1
            time.sleep(0.002)
    return worst


def test_a_fill_under_write_back_writes_ssd_off_the_event_loop(engine, daemon_factory,
                                                               tmp_path):
    """A fill takes DRAM slots like a put: under the write-back SSD policy its eviction first
    writes the dirty victims to SSD, awaited off the event loop, so B's other clients are
    served meanwhile. (A synchronous write in the eviction held every lookup on B for the whole
    batch of writes: ~2 s here at 40 ms a write.) The bound is generous for a shared machine."""
    from concurrent.futures import ThreadPoolExecutor
    from kvstore.core.keys import pack_keys
    a = host(daemon_factory, tmp_path, "a", engine.url)
    b = host(daemon_factory, tmp_path, "b", engine.url, "--ssd-write-policy", "write_back",
             "--remote-read-deadline-s", "60", env={"KVSTORE_TEST_SSD_WRITE_DELAY_S": "0.04"})
    with KVClient(a.socket) as ca, KVClient(b.socket) as cb:
        _, keys, data = put_on(ca, 40, 96)
        wait_for(lambda: remote_row(ca).bytes_in >= 96 * LAYOUT.block_bytes, 60, "A's writes")
        nsb = cb.namespace(MODEL, LAYOUT)
        own = [put_on(cb, 100 + i, 16)[1:] for i in range(32)]   # B's DRAM full of dirty blocks
        stop = threading.Event()
        with ThreadPoolExecutor(1) as pool:
            worst = pool.submit(_worst_lookup_s, b.socket, nsb.namespace_id,
                                pack_keys(own[-1][0]), stop)
            try:
                time.sleep(0.1)
                got = get_exact(nsb, keys, data)   # no lookup first: the get's own fill
            finally:
                stop.set()
            worst_s = worst.result(timeout=120)
        assert got == 96 and remote_row(cb).hits == 96
        ssd = next(t for t in cb.stats().tiers if t.tier == pb.TIER_SSD)
        dram = next(t for t in cb.stats().tiers if t.tier == pb.TIER_DRAM)
        assert dram.demotions >= 96 and ssd.checksum_failures == 0
        for k, d in own[-8:]:                      # B's own blocks: still exact, DRAM or SSD
            assert get_exact(nsb, k, d) == 16
    assert worst_s < 0.5, f"a lookup on B waited {worst_s * 1e3:.0f} ms behind the fill"


@pytest.mark.parametrize("damage", ["flipped_byte", "other_block", "truncated"])
def test_a_corrupted_remote_value_is_never_served(engine, daemon_factory, tmp_path, damage):
    a = host(daemon_factory, tmp_path, "a", engine.url)
    b = host(daemon_factory, tmp_path, "b", engine.url)
    raw = RawClient(engine.url)
    try:
        with KVClient(a.socket) as ca, KVClient(b.socket) as cb:
            ns, keys, data = put_on(ca, 4, 6)
            wait_for(lambda: remote_row(ca).bytes_in >= 6 * LAYOUT.block_bytes, what="writes")
            victim = remote_key(ns.namespace_id, keys[3])
            good = raw.get(victim)
            assert len(good) == 64 + LAYOUT.block_bytes
            if damage == "flipped_byte":
                bad = bytearray(good)
                bad[64 + 1000] ^= 0x01
            elif damage == "other_block":   # a well-formed value of another block
                bad = encode_header(keys[2], ns.namespace_id, data[2].tobytes()) + data[2].tobytes()
            else:
                bad = good[:-4096]
            raw.replace(victim, bytes(bad))
            nsb = cb.namespace(MODEL, LAYOUT)
            assert get_exact(nsb, keys, data) == 3       # the prefix ends before the bad value
            row = remote_row(cb)
            # blocks 0-2 served; 4-5 were read in the same batch, verified and kept in DRAM
            assert row.checksum_failures == 1 and row.hits == 5
            wait_for(lambda: not raw.exists(victim), 10, "removal of the corrupt value")
            assert nsb.lookup(keys).num_cached == 3
    finally:
        raw.close()


def test_a_fill_read_in_chunks_is_verified_block_by_block(engine, daemon_factory, tmp_path):
    """remote_read_chunk_bytes: one fill is read in chunks (here 4 blocks), each verified while
    the next transfers; a bad value in a later chunk still ends the served prefix exactly
    there, and every other block of every chunk is checked and kept."""
    a = host(daemon_factory, tmp_path, "a", engine.url)
    b = host(daemon_factory, tmp_path, "b", engine.url, "--remote-read-chunk-bytes",
             str(4 * LAYOUT.block_bytes))
    raw = RawClient(engine.url)
    try:
        with KVClient(a.socket) as ca, KVClient(b.socket) as cb:
            ns, keys, data = put_on(ca, 8, 14)
            wait_for(lambda: remote_row(ca).bytes_in >= 14 * LAYOUT.block_bytes, what="writes")
            victim = remote_key(ns.namespace_id, keys[9])       # in the third chunk (8-11)
            bad = bytearray(raw.get(victim))
            bad[64 + 5] ^= 0x10
            raw.replace(victim, bytes(bad))
            nsb = cb.namespace(MODEL, LAYOUT)
            assert get_exact(nsb, keys, data) == 9
            row = remote_row(cb)
            assert row.checksum_failures == 1 and row.hits == 13
            wait_for(lambda: not raw.exists(victim), 10, "removal of the corrupt value")
            assert nsb.lookup(keys).num_cached == 9
            assert get_exact(nsb, keys, data) == 9
    finally:
        raw.close()


@pytest.mark.parametrize("fill_on_lookup", [None, "false"])
def test_a_lookup_that_finds_remote_blocks_starts_reading_them(engine, daemon_factory, tmp_path,
                                                               fill_on_lookup):
    """remote_fill_on_lookup (default on): the lookup answers at once, and the blocks it found
    come into B's DRAM in the background, so the get that follows reads nothing itself; off,
    they stay remote until the get. Either way each block is read once, and the two blocks
    past the stored prefix count as misses once (for the get, not for the lookup's fill)."""
    a = host(daemon_factory, tmp_path, "a", engine.url)
    extra = ["--remote-fill-on-lookup", fill_on_lookup] if fill_on_lookup else []
    b = host(daemon_factory, tmp_path, "b", engine.url, *extra)
    with KVClient(a.socket) as ca, KVClient(b.socket) as cb:
        _, _, data = put_on(ca, 9, 8)
        wait_for(lambda: remote_row(ca).bytes_in >= 8 * LAYOUT.block_bytes, what="A's writes")
        nsb = cb.namespace(MODEL, LAYOUT)
        tokens, _ = chain(9, 8)
        more = np.random.default_rng(99).integers(0, 50000, 2 * LAYOUT.block_tokens)
        keys = nsb.block_keys(np.concatenate([tokens, more]))     # A's 8 blocks, then 2 more
        r = nsb.lookup(keys)
        assert r.num_cached == 8 and set(r.tiers) == {"REMOTE"}, r
        if fill_on_lookup is None:
            wait_for(lambda: remote_row(cb).hits == 8, 10, "the fill the lookup started")
            assert nsb.lookup(keys).tiers == ["DRAM"] * 8
        else:
            time.sleep(0.5)
            assert remote_row(cb).hits == 0
            assert set(nsb.lookup(keys).tiers) == {"REMOTE"}
        assert remote_row(cb).misses == 0
        assert get_exact(nsb, keys, data) == 8
        row = remote_row(cb)
        assert row.hits == 8 and row.bytes_out == 8 * LAYOUT.block_bytes and row.misses == 2


def test_a_value_removed_after_the_lookup_is_a_miss(engine, daemon_factory, tmp_path):
    """The get after a lookup reuses the lookup's existence answers (no second existence
    call): a value gone meanwhile must end the served prefix there, never fail the get.
    (B does not fill on lookup, which would read the value before it goes.)"""
    a = host(daemon_factory, tmp_path, "a", engine.url)
    b = host(daemon_factory, tmp_path, "b", engine.url, "--remote-fill-on-lookup", "false")
    raw = RawClient(engine.url)
    try:
        with KVClient(a.socket) as ca, KVClient(b.socket) as cb:
            ns, keys, data = put_on(ca, 6, 6)
            wait_for(lambda: remote_row(ca).bytes_in >= 6 * LAYOUT.block_bytes, what="writes")
            nsb = cb.namespace(MODEL, LAYOUT)
            assert nsb.lookup(keys).num_cached == 6
            raw.remove(remote_key(ns.namespace_id, keys[2]))
            misses0 = remote_row(cb).misses
            assert get_exact(nsb, keys, data) == 2
            row = remote_row(cb)
            assert row.hits == 5 and row.misses - misses0 == 1 and row.checksum_failures == 0
            assert nsb.lookup(keys).num_cached == 2      # asked the engine again: gone
    finally:
        raw.close()


def test_remote_down_costs_misses_never_failures(engine, daemon_factory, tmp_path):
    """The engine (Mooncake master / one Redis master) dies under a read and write load: no SDK
    call fails, no lookup waits past the deadline, and hits resume after a restart."""
    a = host(daemon_factory, tmp_path, "a", engine.url)
    b = host(daemon_factory, tmp_path, "b", engine.url)
    errors: list[BaseException] = []
    lookup_s: list[float] = []
    stop = threading.Event()

    def load(sock: str, seed0: int):
        try:
            with KVClient(sock) as c:
                ns = c.namespace(MODEL, LAYOUT)
                seed = seed0
                while not stop.is_set():
                    tokens, data = chain(seed, 4)
                    keys = ns.block_keys(tokens)
                    ns.put(keys, data).result(timeout=30)
                    t0 = time.monotonic()
                    ns.lookup(keys + ns.block_keys(chain(seed + 1, 4)[0]))
                    lookup_s.append(time.monotonic() - t0)
                    get_exact(ns, keys, data)
                    seed += 2
        except BaseException as exc:      # noqa: BLE001 - the assertion below reports it
            errors.append(exc)

    threads = [threading.Thread(target=load, args=(d.socket, s)) for d, s in ((a, 100), (b, 10**6))]
    for t in threads:
        t.start()
    try:
        with KVClient(a.socket) as ca, KVClient(b.socket) as cb:
            time.sleep(1.0)
            if engine.backend == "mooncake":
                engine.kill()
            else:
                engine.kill_node(0)
            # B keeps looking up a chain A stored before: misses, each within the deadline
            nsb = cb.namespace(MODEL, LAYOUT)
            for i in range(10):
                tokens, _ = chain(7000 + i, 4)
                t0 = time.monotonic()
                r = nsb.lookup(nsb.block_keys(tokens))
                lookup_s.append(time.monotonic() - t0)
                assert r.num_cached == 0
                time.sleep(0.2)
            if engine.backend == "mooncake":
                engine.start()
            else:
                engine.start_node(0)
                engine.wait_ok()

            def remote_hit_again():
                seed = int(time.monotonic() * 1000) % 10**6 + 2 * 10**6
                _, keys, data = put_on(ca, seed, 2)
                time.sleep(0.3)
                nsb2 = cb.namespace(MODEL, LAYOUT)
                before = remote_row(cb).hits
                get_exact(nsb2, keys, data)
                return remote_row(cb).hits > before
            wait_for(remote_hit_again, 40, "remote hits after the restart")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not errors, f"SDK calls failed while the remote was down: {errors[:3]!r}"
    # a lookup waits at most the remote deadline (plus a loaded box's gRPC round trip)
    assert max(lookup_s) < DEADLINE_S + 1.0, f"slowest lookup {max(lookup_s):.2f}s"
    assert len(lookup_s) > 10


def test_daemon_starts_and_serves_with_the_remote_unreachable(daemon_factory, tmp_path):
    from kvstore.bench.cluster_engines import free_port
    d = host(daemon_factory, tmp_path, "a", f"redis://127.0.0.1:{free_port()}")
    with KVClient(d.socket) as c:
        ns, keys, data = put_on(c, 9, 4)
        assert get_exact(ns, keys, data) == 4
        t0 = time.monotonic()
        assert ns.lookup(ns.block_keys(chain(10, 4)[0])).num_cached == 0
        assert time.monotonic() - t0 < DEADLINE_S + 1.0
        wait_for(lambda: remote_row(c).writes_skipped >= 4, 10, "skipped remote writes")


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_bench_cluster_smoke(backend):
    reason = skip_reason(backend)
    if reason:
        pytest.skip(reason)
    r = subprocess.run([sys.executable, "-m", "kvstore", "bench", "cluster", "--backend", backend,
                        "--blocks", "4", "--block-tokens", "16", "--reps", "1", "--shape", "demo",
                        "--ttft-tokens", "256", "--json"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["get_vs_raw_client"] > 0 and out["put_vs_raw_client"] > 0
    # the get's 4 blocks and the acquire's 4, in the warm-up rep and the counted one
    assert out["remote_hits_on_b"] == 16
    assert out["acquire_vs_raw_client"] > 0
    assert out["ttft"]["tiers"] == ["REMOTE"] and out["ttft"]["same_first_token"]
    assert out["ttft_speedup"] > 0


def test_flush_remote_resolves_once_another_host_can_read_the_blocks(engine, daemon_factory,
                                                                     tmp_path):
    """A producer's flush_remote answers once its blocks are readable from the cluster tier:
    the consumer reads all of them at once, with no polling — also under a write policy that
    would not have sent them (write_through_selective queues only read blocks)."""
    for i, policy in enumerate(("write_through", "write_through_selective")):
        a = host(daemon_factory, tmp_path, f"a{i}", engine.url, "--remote-write-policy", policy)
        b = host(daemon_factory, tmp_path, f"b{i}", engine.url)
        with KVClient(a.socket) as ca, KVClient(b.socket) as cb:
            ns, keys, data = put_on(ca, 40 + i, 48)
            placed = ns.flush_remote(keys, deadline_s=20).result(timeout=60)
            assert placed.complete and placed.num_placed == 48 and not placed.timed_out
            nsb = cb.namespace(MODEL, LAYOUT)
            assert get_exact(nsb, keys, data) == 48
            assert remote_row(cb).hits == 48
            # a second flush finds them placed (remembered, or asked of the engine)
            again = ns.flush_remote(keys[:5]).result(timeout=60)
            assert again.placed == [True] * 5
            # blocks this host never held: placed only if the engine has them
            other = ns.block_keys(chain(900 + i, 2)[0])
            assert ns.flush_remote(other, 1.0).result(timeout=60).placed == [False, False]


def test_flush_remote_is_bounded_and_answers_bad_input(daemon_factory, tmp_path):
    from kvstore.bench.cluster_engines import free_port
    from kvstore.client import FailedPrecondition, InvalidArgument, Reason
    d = host(daemon_factory, tmp_path, "a", f"redis://127.0.0.1:{free_port()}")
    plain = daemon_factory("--dram-bytes", "8MiB", "--chunk-bytes", "1MiB")
    with KVClient(d.socket) as c, KVClient(plain.socket) as cp:
        ns, keys, _ = put_on(c, 9, 4)
        t0 = time.monotonic()
        r = ns.flush_remote(keys, deadline_s=1.0).result(timeout=30)
        assert r.placed == [False] * 4 and r.timed_out
        assert time.monotonic() - t0 < 1.0 + DEADLINE_S + 2.0      # the deadline, one probe
        with pytest.raises(InvalidArgument) as e:
            ns.flush_remote(keys, deadline_s=-1).result(timeout=30)
        assert e.value.reason == Reason.BAD_ARGUMENT and "deadline_s" in str(e.value)
        with pytest.raises(FailedPrecondition) as e:
            nsp = cp.namespace(MODEL, LAYOUT)
            nsp.flush_remote(keys).result(timeout=30)
        assert e.value.reason == Reason.NOT_ENABLED


def test_blocks_read_from_the_remote_are_written_to_the_local_ssd(engine, daemon_factory,
                                                                  tmp_path):
    """A verified remote fill is a committed block: under write_through it reaches B's SSD,
    so after B restarts it serves them with the remote values gone."""
    a = host(daemon_factory, tmp_path, "a", engine.url)
    b = host(daemon_factory, tmp_path, "b", engine.url)
    raw = RawClient(engine.url)
    try:
        with KVClient(a.socket) as ca:
            ns, keys, data = put_on(ca, 12, 6)
            assert ns.flush_remote(keys, 20).result(timeout=60).complete
        with KVClient(b.socket) as cb:
            nsb = cb.namespace(MODEL, LAYOUT)
            assert get_exact(nsb, keys, data) == 6 and remote_row(cb).hits == 6
            wait_for(lambda: next(t for t in cb.stats().tiers
                                  if t.tier == pb.TIER_SSD).blocks >= 6, 10, "the SSD writes")
        for k in keys:
            raw.remove(remote_key(ns.namespace_id, k))
        b.stop()
        b.start()
        with KVClient(b.socket) as cb:
            nsb = cb.namespace(MODEL, LAYOUT)
            assert nsb.lookup(keys).tiers == ["SSD"] * 6
            assert get_exact(nsb, keys, data) == 6 and remote_row(cb).hits == 0
    finally:
        raw.close()
