"""A leased get's release rides on the client's next Acquire or Release (client/heldreleases.py):
a real daemon, real clients; the daemon's own count of active leases, read by another client,
shows where each release went."""
import time

import grpc
import numpy as np
import pytest
import torch

from kvstore.client import KVClient, KVLayout
from kvstore.core.keys import pack_keys
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, block_tokens=16, dtype="bfloat16")


def _stored(c: KVClient, n: int = 8):
    ns = c.namespace("held", LAYOUT)
    ns.local_gets = False          # every get leases (the path an SSD or remote hit takes)
    keys = ns.block_keys(list(range(16 * n)))
    kv = torch.randn(n, *LAYOUT.block_shape).to(torch.bfloat16)
    assert ns.put(keys, kv).result() == n
    return ns, keys, kv


def _active_leases(watcher: KVClient) -> int:
    return watcher.stats().active_leases


def test_a_gets_release_rides_on_the_next_acquire(daemon):
    with KVClient(daemon.socket) as c, KVClient(daemon.socket) as watcher:
        ns, keys, kv = _stored(c)
        held = c.held_releases
        held.linger_s = 60.0       # nothing goes alone during the test unless flushed
        assert torch.equal(ns.get(keys[:2]).result(), kv[:2])
        assert _active_leases(watcher) == 1          # proven copy, release held
        assert (held.riding, held.sent_alone) == (0, 0)
        assert torch.equal(ns.get(keys[2:5]).result(), kv[2:5])
        # the second Acquire ended the first lease; the second get's release is held now
        assert _active_leases(watcher) == 1
        assert held.riding == 1
        # a confirmed release (wait=True) carries what is held too
        with ns.acquire(keys[5:7]) as lease:
            assert len(lease) == 2
            assert held.riding == 2
        assert _active_leases(watcher) == 0
        assert torch.equal(ns.get(keys[7:]).result(), kv[7:])
        assert held.flush(10.0)
        assert _active_leases(watcher) == 0 and held.sent_alone == 1
        # the daemon counted every get as a hit: nothing was lost on the way
        assert c.stats().tiers[0].hits >= 8


def test_held_releases_go_alone_within_the_linger(daemon):
    with KVClient(daemon.socket) as c, KVClient(daemon.socket) as watcher:
        ns, keys, kv = _stored(c)
        for i in range(4):
            assert torch.equal(ns.get(keys[2 * i:2 * i + 2]).result(), kv[2 * i:2 * i + 2])
        deadline = time.monotonic() + 5.0
        while _active_leases(watcher) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _active_leases(watcher) == 0
        assert c.held_releases.sent_alone + c.held_releases.riding == 4


def test_held_releases_do_not_count_against_the_clients_limit(daemon_factory):
    """With one get allowed in flight per client, a get whose Acquire carries the previous
    get's release is admitted (the release ends first): without that, each get would wait for
    the previous release, or be refused."""
    d = daemon_factory("--dram-bytes", "64MiB", "--max-inflight-requests-per-client", "1")
    with KVClient(d.socket) as c:
        ns, keys, kv = _stored(c)
        c.held_releases.linger_s = 60.0
        for i in range(8):
            assert torch.equal(ns.get(keys[i:i + 1]).result(), kv[i:i + 1])
        assert c.held_releases.riding == 7


def test_close_delivers_what_is_held(daemon):
    with KVClient(daemon.socket) as watcher:
        c = KVClient(daemon.socket)
        ns, keys, kv = _stored(c)
        c.held_releases.linger_s = 60.0
        assert torch.equal(ns.get(keys).result(), kv)
        assert _active_leases(watcher) == 1
        c.close()
        # the release went out before the session ended (not left to the session's end)
        assert c.held_releases.sent_alone == 1
        assert _active_leases(watcher) == 0


def test_release_fields_are_checked_and_best_effort(daemon):
    with KVClient(daemon.socket) as c:
        ns, keys, kv = _stored(c, 2)
        ch = grpc.insecure_channel(f"unix:{daemon.socket}")
        stub = pb_grpc.KVStoreStub(ch)
        sid, nsid = c.session_id, ns.namespace_id
        lease = stub.Acquire(pb.AcquireRequest(session_id=sid, namespace_id=nsid,
                                               keys=pack_keys(keys)), timeout=10)
        with pytest.raises(grpc.RpcError) as e:
            stub.Acquire(pb.AcquireRequest(session_id=sid, namespace_id=nsid, keys=keys[0],
                                           release_lease_ids=[lease.lease_id],
                                           release_waited_s=[0.1, 0.2]), timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "release_waited_s has 2 entries for 1" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            stub.Release(pb.ReleaseRequest(session_id=sid, release_lease_ids=[lease.lease_id],
                                           release_waited_s=[-1.0]), timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "release_waited_s must be seconds" in e.value.details()
        # unknown and already-ended ids are skipped; the real one ends; the call still leases
        second = stub.Acquire(pb.AcquireRequest(
            session_id=sid, namespace_id=nsid, keys=keys[0],
            release_lease_ids=[987654, lease.lease_id, lease.lease_id],
            release_waited_s=[0.0, 0.001, 0.001]), timeout=10)
        assert list(second.offsets) and second.lease_id
        # a flush-only Release (lease_id 0) ends the second lease
        stub.Release(pb.ReleaseRequest(session_id=sid, release_lease_ids=[second.lease_id]),
                     timeout=10)
        assert c.stats().active_leases == 0
        with pytest.raises(grpc.RpcError) as e:     # ended means ended
            stub.Release(pb.ReleaseRequest(session_id=sid, lease_id=second.lease_id),
                         timeout=10)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        ch.close()
        assert torch.equal(ns.get(keys).result(), kv)      # still serving
