"""The cluster tier under real faults: a Mooncake replica holder SIGKILLed and restarted, a
Redis Cluster master SIGKILLed. What a fault costs is misses, never a served wrong byte and
never the loss of a good value another host stored."""
from __future__ import annotations

import time

import numpy as np
import pytest

from kvstore.client import KVClient
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
