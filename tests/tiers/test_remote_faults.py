"""The cluster tier under real faults: a Mooncake replica holder SIGKILLed and restarted, a
Redis Cluster master SIGKILLed. What a fault costs is misses, never a served wrong byte and
never the loss of a good value another host stored."""
from __future__ import annotations

import time

import numpy as np
import pytest

from kvstore.client import KVClient
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.tiers.remote.codec import remote_key
from kvstore.bench.cluster_engines import RawClient, skip_reason, start_engine
from support.remote import LAYOUT, MODEL, host, put_on, remote_row, wait_for


def _engine(backend, tmp_path):
    reason = skip_reason(backend)
    if reason:
        pytest.skip(reason)
    return start_engine(backend, tmp_path / "engine")


def get_prefix(ns, keys, data) -> int:
    """Blocks served (a prefix), each compared byte for byte with what was stored."""
    out = np.empty((len(keys), *LAYOUT.block_shape), dtype=np.uint8)
    got = np.asarray(ns.get(keys, out=out).result(timeout=60))
    assert np.array_equal(got, data[:len(got)]), "served bytes differ from what was stored"
    return len(got)


def test_a_dead_replica_holder_costs_misses_never_good_values(daemon_factory, tmp_path):
    """Right after a replica holder dies, Mooncake fails reads of intact objects whose chosen
    replica lived there (TRANSFER_FAIL, -800). That is a miss and a remote error, retried
    later — never a checksum failure and never a removal: every value stays in the cluster,
    and once the master has dropped the dead segment every block is served again, also by
    the restarted host."""
    engine = _engine("mooncake", tmp_path)
    raw = None
    try:
        rep = ("--remote-replicas", "2")
        a = host(daemon_factory, tmp_path, "a", engine.url, *rep)
        b = host(daemon_factory, tmp_path, "b", engine.url, *rep)
        # the reader lends no memory: every block it reads comes from another host's segment
        r = host(daemon_factory, tmp_path, "r", engine.url, *rep, "--remote-segment-bytes", "0")
        with KVClient(b.socket) as cb:   # a daemon joins (lends its segment) on its first call
            cb.namespace(MODEL, LAYOUT).lookup([bytes(16)])
        n = 80
        with KVClient(a.socket) as ca:
            ns, keys, data = put_on(ca, 20, n)
            wait_for(lambda: remote_row(ca).bytes_in >= n * LAYOUT.block_bytes, 30,
                     "A's writes")
        raw = RawClient(engine.url)
        rkeys = [remote_key(ns.namespace_id, k) for k in keys]
        # every block has one replica on A (the writer's own segment) and one on B
        a.kill()
        with KVClient(r.socket) as cr:     # at once: the master still lists A's segment
            nsr = cr.namespace(MODEL, LAYOUT)
            get_prefix(nsr, keys, data)
            row = remote_row(cr)
            assert row.checksum_failures == 0 and row.io_errors > 0, row
            gone = [i for i, rk in enumerate(rkeys) if not raw.exists(rk)]
            assert not gone, f"{len(gone)} of {n} good values were removed from the cluster"
            a.start()
            with KVClient(a.socket) as ca:
                nsa = ca.namespace(MODEL, LAYOUT)
                # the blocks a failed read missed are read again later, and all are served
                for nsx in (nsr, nsa):
                    wait_for(lambda: get_prefix(nsx, keys, data) == n, 60, "all blocks served")
                assert remote_row(ca).checksum_failures == 0
            assert remote_row(cr).checksum_failures == 0
    finally:
        if raw is not None:
            raw.close()
        engine.stop()


def test_a_dead_redis_master_costs_its_keys_only(daemon_factory, tmp_path):
    """One of three Redis masters (no replicas, full coverage not required) is SIGKILLed: the
    keys the live masters hold are still read and written, byte exact; the dead master's keys
    are misses and writes not sent, counted; the tier's circuit stays closed. After the
    master restarts (empty), its keys are written and read again."""
    engine = _engine("redis", tmp_path)
    raw = None
    try:
        a = host(daemon_factory, tmp_path, "a", engine.url)
        b = host(daemon_factory, tmp_path, "b", engine.url)
        raw = RawClient(engine.url)
        dead_port = engine.ports[0]

        def on_dead(ns, keys) -> list[bool]:
            return [raw.c.get_node_from_key(remote_key(ns.namespace_id, k)).port == dead_port
                    for k in keys]

        n = 24                       # one-block chains: each key is one get, on one node
        with KVClient(a.socket) as ca, KVClient(b.socket) as cb:
            chains = [put_on(ca, 300 + i, 1) for i in range(n)]
            wait_for(lambda: remote_row(ca).bytes_in >= n * LAYOUT.block_bytes, 30, "writes")
            dead = [on_dead(ns, keys)[0] for ns, keys, _ in chains]
            assert 0 < sum(dead) < n, "the chains should span the dead and the live masters"
            engine.kill_node(0)
            nsb = cb.namespace(MODEL, LAYOUT)
            served = [get_prefix(nsb, keys, data) for _, keys, data in chains]
            assert served == [0 if d else 1 for d in dead]
            row = remote_row(cb)
            assert row.hits == n - sum(dead) and row.checksum_failures == 0
            assert row.circuit_state == "closed"
            # new blocks: those of live masters are written, the dead master's skipped
            fresh = [put_on(cb, 600 + i, 1) for i in range(n)]
            fdead = [on_dead(ns, keys)[0] for ns, keys, _ in fresh]
            live_keys = [remote_key(ns.namespace_id, keys[0])
                         for (ns, keys, _), d in zip(fresh, fdead) if not d]
            wait_for(lambda: all(raw.c.exists(k) for k in live_keys), 30, "live writes")
            wait_for(lambda: remote_row(cb).writes_skipped >= sum(fdead), 30, "skipped writes")
            nodes = {nd.node: nd for nd in row_nodes(cb)}
            assert nodes[f"127.0.0.1:{dead_port}"].keys_unavailable >= sum(dead) + sum(fdead)
            assert all(nd.keys_unavailable == 0 and nd.circuit_state == "closed"
                       for name, nd in nodes.items() if name != f"127.0.0.1:{dead_port}")
            engine.start_node(0)
            engine.wait_ok()
            # the restarted master is empty: A's blocks there are gone, the new ones land
            again = [put_on(ca, 900 + i, 1) for i in range(n)]
            adead = [on_dead(ns, keys)[0] for ns, keys, _ in again]
            dead_keys = [remote_key(ns.namespace_id, keys[0])
                         for (ns, keys, _), d in zip(again, adead) if d]
            wait_for(lambda: all(raw.c.exists(k) for k in dead_keys), 30,
                     "writes to the restarted master")
            # B's breaker for that master lets a probe through within its cooldown (<= 10 s)
            wait_for(lambda: [get_prefix(nsb, keys, data) for _, keys, data in again] == [1] * n,
                     30, "reads from the restarted master")
    finally:
        if raw is not None:
            raw.close()
        engine.stop()


def row_nodes(client):
    return list(remote_row(client).remote_nodes)


def test_shutdown_with_the_master_gone_keeps_to_the_grace(daemon_factory, tmp_path):
    """SIGTERM with the Mooncake master dead: every engine call made at shutdown (the queued
    writes, the client's unmount) is bounded by shutdown_grace_s, and the exit is clean."""
    engine = _engine("mooncake", tmp_path)
    try:
        grace_s = 2.0
        a = host(daemon_factory, tmp_path, "a", engine.url, "--shutdown-grace-s", str(grace_s))
        with KVClient(a.socket) as ca:
            ns, keys, _ = put_on(ca, 30, 8)
            assert ns.flush_remote(keys, 20).result(timeout=60).complete   # joined the master
            engine.kill()
            put_on(ca, 31, 8)         # writes queued for a master that is gone
            time.sleep(3.0)           # the client's heartbeats to the master fail meanwhile
            ns.lookup(ns.block_keys(np.arange(64 * LAYOUT.block_tokens)))   # calls in flight
        t0 = time.monotonic()
        rc = a.stop(timeout_s=60)
        took = time.monotonic() - t0
        assert rc == 0, a.log()[-3000:]
        assert took < grace_s + 2.0, f"shutdown took {took:.1f}s with a {grace_s}s grace"
        assert not list(a.shm_dir.iterdir()), "the daemon left files in its shared-memory dir"
    finally:
        engine.stop()


def test_a_stalled_engine_read_ends_as_misses_and_gives_its_slots_back(daemon_factory, tmp_path):
    """Every Redis master is SIGSTOPped under a fill (a real stall: the sockets accept, nothing
    answers): the get ends as misses within the read deadline, the fill's allocation expires
    meanwhile, and once the engine answers again every slot the fill held is free — none left
    quarantined for good."""
    import signal
    engine = _engine("redis", tmp_path)
    stopped = []
    try:
        a = host(daemon_factory, tmp_path, "a", engine.url)
        b = host(daemon_factory, tmp_path, "b", engine.url, "--remote-fill-on-lookup", "false",
                 "--allocation-timeout-s", "1")
        with KVClient(a.socket) as ca, KVClient(b.socket) as cb:
            ns, keys, data = put_on(ca, 50, 16)
            assert ns.flush_remote(keys, 20).result(timeout=60).complete
            nsb = cb.namespace(MODEL, LAYOUT)
            assert nsb.lookup(keys).num_cached == 16    # the get reuses this existence answer
            for p in engine.procs.values():
                p.send_signal(signal.SIGSTOP)
                stopped.append(p)
            t0 = time.monotonic()
            assert get_prefix(nsb, keys, data) == 0
            assert time.monotonic() - t0 < 2.0 + 2.0           # the read deadline, and a margin
            time.sleep(2.5)                                   # the allocation expires meanwhile
            for p in stopped:
                p.send_signal(signal.SIGCONT)
            stopped.clear()

            def dram():
                return next(t for t in cb.stats().tiers if t.tier == pb.TIER_DRAM)
            # the stalled call returns (its replies arrive): the fill's slots come back
            wait_for(lambda: dram().used_bytes == 0, 20, "the stalled fill's slots freed")
            assert dram().blocks == 0
            # and the blocks are read again by the next get
            wait_for(lambda: get_prefix(nsb, keys, data) == 16, 20, "a later get served")
    finally:
        for p in stopped:
            p.send_signal(signal.SIGCONT)
        engine.stop()
