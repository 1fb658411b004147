"""The read contract (docs/guarantees.md): a get returns exactly the bytes put under each key,
or a miss. Real daemon processes, real reader processes, slots really reused under a reader."""
from __future__ import annotations

import json
import logging
import random
import signal
import time

import numpy as np
import pytest

from kvstore.client import KVClient, KVLayout, StaleRead
from support.net import UnixProxy
from support.readerproc import LAYOUT, block_for
from support.readers import churn, drain, start_reader

N = 48                      # reader's blocks: 24 MiB per get
DAEMON_ARGS = ("--dram-bytes", "36MiB", "--chunk-bytes", "4MiB",   # 8 chunks = 64 slots
               "--max-inflight-bytes-per-client", "256MiB")


def _wait(cond, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def _stop_mid_get(p, c: KVClient) -> bool:
    """SIGSTOP the reader while it holds a lease (between Acquire and Release: copying)."""
    time.sleep(random.uniform(0.0, 0.03))
    p.send_signal(signal.SIGSTOP)
    if c.stats().active_leases:
        return True
    p.send_signal(signal.SIGCONT)
    return False


def _reuse_under_reader(daemon_factory, tmp_path, shm: bool):
    """Rounds of: reader stopped mid-get → its lease ends (session cut / expiry) → its slots
    get other bytes → reader resumes. Returns the results of the gets that were caught."""
    args = DAEMON_ARGS + (() if shm else ("--lease-timeout-s", "1"))
    d = daemon_factory(*args)
    proxy = UnixProxy(str(tmp_path / "proxy.sock"), d.socket) if shm else None
    caught: list[dict] = []
    seen: list[dict] = []
    with KVClient(d.socket) as c:
        deadline = time.monotonic() + 90
        round_no = 0
        # until a get was caught with its slots reused (a shorter result), or wrong bytes
        while (time.monotonic() < deadline and round_no < 8
               and not any(r["n"] < N or r["bad"] for r in caught)):
            round_no += 1
            p, lines = start_reader(proxy.path if shm else d.socket, N, shm)
            try:
                while time.monotonic() < deadline and not _stop_mid_get(p, c):
                    pass
                expired = c.stats().leases_expired
                if shm:
                    proxy.cut()       # the daemon ends the reader's session: its leases go
                    assert _wait(lambda: c.stats().active_leases == 0, 10)
                else:                 # the stream stalls; its lease expires
                    assert _wait(lambda: c.stats().leases_expired > expired, 10)
                seen += drain(lines)
                churned = churn(c, round_no)
                p.send_signal(signal.SIGCONT)
                caught.append(json.loads(lines.get(timeout=60)))
                time.sleep(0.2)
                seen += drain(lines)
                ns = c.namespace("reads", LAYOUT)
                ns.delete(churned)
            finally:
                p.send_signal(signal.SIGCONT)
                p.kill()
                p.wait()
    if proxy is not None:
        proxy.close()
    return caught, seen + caught


def test_get_never_returns_bytes_of_a_slot_reused_after_its_session_ended(daemon_factory,
                                                                         tmp_path):
    caught, every = _reuse_under_reader(daemon_factory, tmp_path, shm=True)
    assert every and all(r["bad"] == 0 for r in every), every
    # the slots really were reused under at least one get's copy: it returned a shorter prefix
    assert any(r["n"] < N and not r["error"] for r in caught), caught


def test_streamed_get_of_an_expired_lease_is_a_shorter_prefix(daemon_factory, tmp_path):
    caught, every = _reuse_under_reader(daemon_factory, tmp_path, shm=False)
    assert every and all(r["bad"] == 0 for r in every), every
    # rows the daemon could not send while the lease held are missing: a prefix (or a miss,
    # when the lease ended before the stream began), never an error or unwritten rows
    assert all(not r["error"] for r in caught), caught
    assert any(r["n"] < N for r in caught), caught


def test_lease_valid_prefix_sees_slot_reuse_after_expiry(daemon_factory):
    """The seqlock itself: a lease that expired and whose slots were written over proves
    nothing any more (valid_prefix 0), and its release is a StaleRead."""
    d = daemon_factory(*DAEMON_ARGS, "--lease-timeout-s", "1")
    with KVClient(d.socket) as c:
        ns = c.namespace("reads", LAYOUT)
        keys = ns.block_keys(list(range(16 * N)))
        ns.put(keys, np.stack([block_for(k, 0) for k in keys])).result()
        lease = ns.acquire(keys)
        assert len(lease) == N and lease.valid_prefix() == N
        assert _wait(lambda: c.stats().leases_expired == 1, 10)
        assert lease.valid_prefix() == N          # expired, but nothing reused yet
        churn(c, 1)
        views = lease.views("numpy")
        changed = [i for i in range(N) if not np.array_equal(
            views[i].view(np.float32).reshape(LAYOUT.block_shape), block_for(keys[i], 0))]
        assert changed, "the churn did not reuse the leased slots"
        assert lease.valid_prefix() <= changed[0]
        with pytest.raises(StaleRead):
            lease.release()


@pytest.mark.parametrize("shm", [True, False])
def test_read_your_writes_readme_example(daemon, shm):
    """put then get at once, as in the README: the get always sees the whole put."""
    layout = KVLayout(num_layers=4, num_kv_heads=2, head_dim=64, block_tokens=16,
                      dtype="float32")
    with KVClient(daemon.socket, shared_memory=shm) as client:
        ns = client.namespace("ryw", layout)
        for i in range(40):
            keys = ns.block_keys([i] + list(range(16 * 6 - 1)))
            kv = np.random.default_rng(i).standard_normal((6, *layout.block_shape),
                                                          dtype=np.float32)
            ns.put(keys, kv)
            got = ns.get(keys).result()
            assert len(got) == 6 and np.array_equal(np.asarray(got), kv), i
            keys2 = ns.block_keys([i, 7] + list(range(16 * 2 - 2)))
            ns.put(keys2, kv[:2])
            assert ns.lookup(keys2).num_cached == 2, i
            ns.put(keys2, kv[:2])
            assert ns.delete(keys2) == 2, i     # a delete waits for the put, else it lands after
            assert ns.lookup(keys2).num_cached == 0, i


def test_close_drains_releases_and_puts(daemon, caplog):
    layout = KVLayout(num_layers=4, num_kv_heads=2, head_dim=64, block_tokens=16,
                      dtype="float32")
    kv = np.ones((4, *layout.block_shape), dtype=np.float32)
    caplog.set_level(logging.INFO, logger="kvstore.client")
    for i in range(25):
        c = KVClient(daemon.socket)
        ns = c.namespace("close", layout)
        keys = ns.block_keys([i] + list(range(16 * 4 - 1)))
        ns.put(keys, kv)                  # still in flight at close: close waits for it
        futs = [ns.get(keys) for _ in range(3)]
        c.close()
        assert all(len(f.result()) == 4 for f in futs)
    assert "release failed" not in caplog.text, caplog.text
    with KVClient(daemon.socket) as c:
        st = c.stats()
        # every lease was released by its client, none reclaimed at session end or expired
        assert st.active_leases == 0 and st.sessions_reclaimed == 0 and st.leases_expired == 0
        ns = c.namespace("close", layout)
        assert all(ns.lookup(ns.block_keys([i] + list(range(63)))).num_cached == 4
                   for i in range(25))


def test_cancelled_acquire_leaves_no_lease(daemon_factory, tmp_path):
    """A get whose Acquire outlives the client's deadline (a slow SSD promotion) is cancelled
    in the servicer: its lease, never answered, must end then, not pin the blocks until the
    lease timeout (30 s)."""
    from kvstore.client import KVStoreError
    from support.ssd import LAYOUT as SSD_LAYOUT, on_ssd

    d, [(keys, _)] = on_ssd(daemon_factory, tmp_path, extra=("--ssd-read-limit", "100kB/s"))
    with KVClient(d.socket, timeout_s=0.5) as c:
        ns = c.namespace("m", SSD_LAYOUT)
        with pytest.raises(KVStoreError):
            ns.get(keys).result()
        assert _wait(lambda: c.stats().active_leases == 0, 8), c.stats().active_leases
        assert c.stats().leases_expired == 0


def test_async_client_close_drains_releases(daemon, caplog):
    import asyncio

    from kvstore.client import AsyncKVClient

    layout = KVLayout(num_layers=4, num_kv_heads=2, head_dim=64, block_tokens=16,
                      dtype="float32")
    kv = np.ones((2, *layout.block_shape), dtype=np.float32)
    caplog.set_level(logging.INFO, logger="kvstore.client")

    async def main():
        for i in range(10):
            c = await AsyncKVClient(daemon.socket)
            ns = await c.namespace("aclose", layout)
            keys = ns.block_keys([i] + list(range(31)))
            await ns.put(keys, kv)
            assert len(await ns.get(keys)) == 2
            await c.close()
    asyncio.run(main())
    assert "release failed" not in caplog.text, caplog.text
    with KVClient(daemon.socket) as c:
        st = c.stats()
        assert st.active_leases == 0 and st.sessions_reclaimed == 0


def test_failed_rpcs_leave_nothing_behind(daemon):
    """Every refused put/get step leaves no slot, block, allocation or lease behind."""
    import grpc

    from kvstore.core.keys import pack_keys
    from kvstore.v1 import kvstore_pb2 as pb
    from kvstore.v1 import kvstore_pb2_grpc as pb_grpc

    layout = KVLayout(num_layers=4, num_kv_heads=2, head_dim=64, block_tokens=16,
                      dtype="float32")
    with KVClient(daemon.socket) as c:
        ns = c.namespace("leaks", layout)
        sid, nsid = c.session_id, ns.namespace_id
        keys = ns.block_keys(list(range(16 * 4)))
        stub = pb_grpc.KVStoreStub(grpc.insecure_channel(f"unix:{daemon.socket}"))
        bad = [
            ("Allocate", pb.AllocateRequest(session_id=sid, namespace_id=nsid,
                                            keys=pack_keys(keys[:2] * 2))),       # duplicates
            ("Allocate", pb.AllocateRequest(session_id=sid, namespace_id=nsid,
                                            keys=pack_keys(keys), parent_key=b"x")),
            ("Allocate", pb.AllocateRequest(session_id=sid, namespace_id=nsid, keys=b"abc")),
            ("Allocate", pb.AllocateRequest(session_id=sid + 999, namespace_id=nsid,
                                            keys=pack_keys(keys))),
            ("Commit", pb.CommitRequest(session_id=sid, allocation_id=12345)),
            ("Acquire", pb.AcquireRequest(session_id=sid, namespace_id=b"nope",
                                          keys=pack_keys(keys))),
            ("Release", pb.ReleaseRequest(session_id=sid, lease_id=777)),
        ]
        for method, req in bad:
            with pytest.raises(grpc.RpcError):
                getattr(stub, method)(req, timeout=5)
        # an allocation whose write is refused, then aborted
        a = stub.Allocate(pb.AllocateRequest(session_id=sid, namespace_id=nsid,
                                             keys=pack_keys(keys)), timeout=5)
        with pytest.raises(grpc.RpcError):
            stub.WriteBlocks(pb.WriteBlocksRequest(
                session_id=sid, allocation_id=a.allocation_id, first_index=3,
                data=b"\0" * layout.block_bytes * 2), timeout=5)
        stub.Commit(pb.CommitRequest(session_id=sid, allocation_id=a.allocation_id, abort=True),
                    timeout=5)
        st = c.stats()
        dram = [t for t in st.tiers if t.tier == pb.TIER_DRAM][0]
        assert (dram.used_bytes, dram.blocks, st.active_leases) == (0, 0, 0)
        assert ns.lookup(keys).num_cached == 0
        assert ns.put(keys, np.zeros((4, *layout.block_shape), np.float32)).result() == 4
