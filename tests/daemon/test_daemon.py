"""Integration: a real `kvstore serve` process and real client processes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from kvstore.client import (AsyncKVClient, FailedPrecondition, InvalidArgument, KVClient,
                            KVLayout, ResourceExhausted)
from kvstore.core.keys import pack_keys
from kvstore.testing.daemon import DaemonProcess
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc
from support import SUPPORT, clientproc

LAYOUT = KVLayout(num_layers=4, num_kv_heads=2, head_dim=64, block_tokens=16, dtype="bfloat16")


def run_client(*args, timeout=120):
    return subprocess.run([sys.executable, str(SUPPORT / "clientproc.py"), *args],
                          capture_output=True, text=True, timeout=timeout)


def test_put_get_roundtrip_every_byte(daemon):
    with KVClient(daemon.socket) as c:
        assert c.shared_memory
        ns = c.namespace("llama", LAYOUT)
        tokens = list(range(16 * 10 + 5))           # ends mid-block: 10 full blocks
        keys = ns.block_keys(tokens)
        assert len(keys) == 10
        kv = torch.randn(10, *LAYOUT.block_shape).to(torch.bfloat16)
        assert ns.lookup(keys).num_cached == 0
        assert ns.put(keys, kv).result() == 10
        assert ns.put(keys, kv).result() == 0       # already stored
        r = ns.lookup(keys)
        assert r.num_cached == 10 and r.tiers == ["DRAM"] * 10
        got = ns.get(keys).result()
        assert got.dtype == torch.bfloat16 and torch.equal(got, kv)
        out = torch.zeros(12, *LAYOUT.block_shape, dtype=torch.bfloat16)
        unknown = ns.block_keys(list(range(5000, 5032)))
        part = ns.get(keys[:3] + unknown, out=out).result()
        assert part.shape[0] == 3 and torch.equal(part, kv[:3])
        with ns.acquire(keys[2:4]) as lease:
            views = lease.views()
            assert torch.equal(views[1].view(torch.bfloat16).view(LAYOUT.block_shape), kv[3])
        assert ns.delete(keys[5:]) == 5
        assert ns.lookup(keys).num_cached == 5
        st = c.stats()
        dram = st.tiers[0]
        assert dram.blocks == 5 and dram.hits >= 13 and dram.misses >= 2
        assert st.namespaces[0].model_id == "llama" and st.namespaces[0].blocks == 5


def test_numpy_and_async_clients(daemon):
    import asyncio

    layout = KVLayout(2, 1, 32, block_tokens=8, dtype="float32")

    async def main():
        async with AsyncKVClient(daemon.socket) as c:
            ns = await c.namespace("np-model", layout)
            keys = ns.block_keys(list(range(24)))
            kv = np.random.default_rng(0).standard_normal((3, *layout.block_shape), dtype=np.float32)
            assert await ns.put(keys, kv) == 3
            got = await ns.get(keys)
            assert np.array_equal(np.asarray(got), kv)
            assert (await ns.lookup(keys)).num_cached == 3
            assert await ns.delete(keys) == 3
    asyncio.run(main())


def test_remote_client_streams_bytes_with_same_semantics(daemon):
    with KVClient(daemon.socket, shared_memory=False) as c, KVClient(daemon.socket) as local:
        assert not c.shared_memory
        ns = c.namespace("llama", LAYOUT)
        keys = ns.block_keys(list(range(16 * 6)))
        kv = torch.randn(6, *LAYOUT.block_shape).to(torch.bfloat16)
        assert ns.put(keys, kv).result() == 6
        assert torch.equal(ns.get(keys).result(), kv)
        # what one path wrote the other reads
        assert torch.equal(local.namespace("llama", LAYOUT).get(keys).result(), kv)


def test_four_client_processes_on_overlapping_prefixes(daemon):
    procs = [subprocess.Popen([sys.executable, str(SUPPORT / "clientproc.py"), "churn",
                               daemon.socket, str(seed), "40"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in range(4)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, f"client failed: {out} {err}"
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert all(r["bad"] == 0 for r in results)
    assert sum(r["blocks_read"] for r in results) > 100
    assert sum(r["written"] for r in results) > 0
    with KVClient(daemon.socket) as c:
        st = c.stats()
        assert st.active_leases == 0 and st.tiers[0].hits > 100


def test_client_killed_mid_put_leaves_nothing_visible(daemon):
    r = run_client("put-and-die", daemon.socket, "8")
    assert r.returncode == -9 and json.loads(r.stdout)["allocated"] == 8
    with KVClient(daemon.socket) as c:
        ns = c.namespace("shared-doc", clientproc.LAYOUT)
        keys = ns.block_keys(list(range(900_000, 900_000 + 16 * 8)))
        _wait_for(lambda: c.stats().tiers[0].used_bytes == 0)
        assert ns.lookup(keys).num_cached == 0
        assert len(ns.get(keys).result()) == 0
        # the same keys can be stored by someone else afterwards, with the right bytes
        assert ns.put(keys, clientproc.blocks_for(keys)).result() == 8
        got = np.asarray(ns.get(keys).result())
        assert np.array_equal(got.view(np.uint8), clientproc.blocks_for(keys).view(np.uint8))


def test_client_killed_holding_a_lease_is_reclaimed(daemon):
    r = run_client("lease-and-die", daemon.socket, "4")
    assert r.returncode == -9 and json.loads(r.stdout)["leased"] == 4
    with KVClient(daemon.socket) as c:
        _wait_for(lambda: c.stats().active_leases == 0)
        assert c.stats().sessions_reclaimed >= 1
        ns = c.namespace("shared-doc", clientproc.LAYOUT)
        keys = ns.block_keys(list(range(800_000, 800_000 + 16 * 4)))
        assert ns.delete(keys) == 4
        assert c.stats().tiers[0].used_bytes == 0  # nothing held the slots back


def test_full_arena_evicts_and_all_leased_is_resource_exhausted(daemon_factory):
    # one client may lease the whole tier here (the default per-client limit is half of it)
    d = daemon_factory("--dram-bytes", "64MiB", "--chunk-bytes", "16MiB",
                       "--max-inflight-bytes-per-client", "128MiB")
    layout = KVLayout(num_layers=16, num_kv_heads=8, head_dim=128, block_tokens=16,
                      dtype="bfloat16")  # 1 MiB blocks: 64 fit
    with KVClient(d.socket) as c:
        ns = c.namespace("big", layout)
        kv = torch.ones(16, *layout.block_shape, dtype=torch.bfloat16)
        chains = [ns.block_keys(list(range(i * 1000, i * 1000 + 256))) for i in range(8)]
        for keys in chains:                       # 128 blocks into 64 slots
            assert ns.put(keys, kv).result() == 16
        st = c.stats().tiers[0]
        assert st.evictions == 64 and st.blocks == 64
        assert ns.lookup(chains[0]).num_cached == 0 and ns.lookup(chains[-1]).num_cached == 16
        leases = [ns.acquire(keys) for keys in chains[4:]]
        assert sum(len(l) for l in leases) == 64
        with pytest.raises(ResourceExhausted, match="DRAM tier full"):
            ns.put(ns.block_keys(list(range(10**6, 10**6 + 16))), kv[:1]).result()
        for l in leases:
            l.release()
        assert ns.put(ns.block_keys(list(range(10**6, 10**6 + 16))), kv[:1]).result() == 1


def test_bad_inputs_get_precise_statuses_and_daemon_keeps_serving(daemon):
    with KVClient(daemon.socket) as c:
        ns = c.namespace("llama", LAYOUT)
        keys = ns.block_keys(list(range(64)))
        with pytest.raises(InvalidArgument, match="dtype"):
            ns.put(keys, torch.zeros(4, *LAYOUT.block_shape, dtype=torch.float16))
        with pytest.raises(InvalidArgument, match="shape"):
            ns.put(keys, torch.zeros(3, *LAYOUT.block_shape, dtype=torch.bfloat16))
        with pytest.raises(FailedPrecondition, match="layout mismatch"):
            c.namespace("llama", KVLayout(4, 2, 128, block_tokens=16))

        ch = grpc.insecure_channel(f"unix:{daemon.socket}",
                                   options=[("grpc.max_send_message_length", 256 << 20)])
        stub = pb_grpc.KVStoreStub(ch)
        sid = c.session_id
        nsid = ns.namespace_id

        def status(method, req):
            with pytest.raises(grpc.RpcError) as e:
                getattr(stub, method)(req, timeout=10)
            return e.value.code(), e.value.details()

        code, msg = status("Lookup", pb.LookupRequest(namespace_id=b"x" * 16, keys=keys[0]))
        assert code == grpc.StatusCode.NOT_FOUND and "unknown namespace" in msg
        code, msg = status("Lookup", pb.LookupRequest(namespace_id=nsid, keys=b"abc"))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "multiple of 16" in msg
        code, msg = status("Allocate", pb.AllocateRequest(session_id=sid, namespace_id=nsid,
                                                          keys=pack_keys([keys[0], keys[0]])))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "duplicate" in msg
        code, msg = status("Acquire", pb.AcquireRequest(session_id=sid, namespace_id=nsid,
                                                        keys=b"k" * 16 * 5000))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_batch_blocks" in msg
        code, msg = status("Commit", pb.CommitRequest(session_id=sid, allocation_id=424242))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "424242" in msg
        code, msg = status("Release", pb.ReleaseRequest(session_id=sid, lease_id=777))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "777" in msg
        code, msg = status("Allocate", pb.AllocateRequest(session_id=99999, namespace_id=nsid,
                                                          keys=keys[0]))
        assert code == grpc.StatusCode.NOT_FOUND and "unknown session" in msg
        code, msg = status("RegisterNamespace", pb.RegisterNamespaceRequest(
            model_id="m", layout=pb.KVLayout(num_layers=0, num_kv_heads=1, head_dim=1,
                                             block_tokens=1, dtype="float16")))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "num_layers" in msg
        # a block write outside the allocation, and of the wrong size
        a = stub.Allocate(pb.AllocateRequest(session_id=sid, namespace_id=nsid,
                                             keys=pack_keys(keys[:2])), timeout=10)
        code, msg = status("WriteBlocks", pb.WriteBlocksRequest(
            session_id=sid, allocation_id=a.allocation_id, first_index=1,
            data=b"\0" * LAYOUT.block_bytes * 2))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "outside the allocation" in msg
        code, msg = status("WriteBlocks", pb.WriteBlocksRequest(
            session_id=sid, allocation_id=a.allocation_id, first_index=0, data=b"\0" * 100))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a multiple" in msg
        stub.Commit(pb.CommitRequest(session_id=sid, allocation_id=a.allocation_id, abort=True),
                    timeout=10)
        # double release of a real lease
        ns.put(keys[:1], torch.zeros(1, *LAYOUT.block_shape, dtype=torch.bfloat16)).result()
        lease = stub.Acquire(pb.AcquireRequest(session_id=sid, namespace_id=nsid,
                                               keys=keys[0]), timeout=10)
        stub.Release(pb.ReleaseRequest(session_id=sid, lease_id=lease.lease_id), timeout=10)
        code, msg = status("Release", pb.ReleaseRequest(session_id=sid, lease_id=lease.lease_id))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "already released" in msg
        # oversized message
        code, msg = status("Lookup", pb.LookupRequest(namespace_id=nsid, keys=b"k" * (80 << 20)))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        ch.close()
        # still serving, for this client and for a new one
        assert ns.lookup(keys[:1]).num_cached == 1
    with KVClient(daemon.socket) as c2:
        assert c2.namespace("llama", LAYOUT).lookup(keys[:1]).num_cached == 1


def test_sigterm_shuts_down_cleanly(daemon):
    with KVClient(daemon.socket) as c:
        ns = c.namespace("llama", LAYOUT)
        keys = ns.block_keys(list(range(32)))
        ns.put(keys, torch.zeros(2, *LAYOUT.block_shape, dtype=torch.bfloat16)).result()
        arena = Path(c.arena.path)
        assert arena.exists()
        assert daemon.stop() == 0
        assert not arena.exists() and not os.path.exists(daemon.socket)
        assert "stopped" in daemon.log()


def test_cli_stats_table_json_and_exit_codes(daemon, tmp_path):
    with KVClient(daemon.socket) as c:
        ns = c.namespace("llama", LAYOUT)
        ns.put(ns.block_keys(list(range(48))),
               torch.zeros(3, *LAYOUT.block_shape, dtype=torch.bfloat16)).result()
    run = lambda *a: subprocess.run([sys.executable, "-m", "kvstore", "stats", *a],
                                    capture_output=True, text=True, timeout=60)
    r = run("--socket", daemon.socket)
    assert r.returncode == 0, r.stderr
    assert "DRAM" in r.stdout and "hit rate" in r.stdout and "'llama'" in r.stdout
    r = run("--socket", daemon.socket, "--json")
    data = json.loads(r.stdout)
    assert data["tiers"][0]["tier"] == "DRAM" and data["tiers"][0]["blocks"] == 3
    assert data["namespaces"][0]["blocks"] == 3
    r = run("--socket", str(tmp_path / "nobody.sock"), "--timeout", "1")
    assert r.returncode == 1 and "cannot reach the daemon" in r.stderr


def test_second_daemon_on_same_socket_is_refused(daemon):
    with KVClient(daemon.socket) as c:
        ns = c.namespace("llama", LAYOUT)
        keys = ns.block_keys(list(range(32)))
        kv = torch.full((2, *LAYOUT.block_shape), 7, dtype=torch.bfloat16)
        assert ns.put(keys, kv).result() == 2
    (arena,) = daemon.shm_dir.glob("*.arena")
    sock_ino = os.stat(daemon.socket).st_ino
    r = subprocess.run([sys.executable, "-m", "kvstore", "serve", "--socket", daemon.socket,
                        "--dram-bytes", "64MiB", "--shm-dir", str(daemon.shm_dir)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "another daemon is listening" in r.stderr
    assert "stopped" not in r.stderr and "draining" not in r.stderr   # it never started
    # The refused daemon removed nothing of the running one's: same socket file, same arena,
    # and the first daemon still answers on it with the bytes it holds.
    assert os.stat(daemon.socket).st_ino == sock_ino
    assert list(daemon.shm_dir.glob("*.arena")) == [arena]
    with KVClient(daemon.socket) as c:
        got = c.namespace("llama", LAYOUT).get(keys).result()
        assert torch.equal(got, kv)
    assert daemon.proc.poll() is None
    assert daemon.stop() == 0 and not os.path.exists(daemon.socket)   # the owner removes it


def test_daemons_started_together_on_one_socket_leave_exactly_one(tmp_path, shm_dir):
    # Started at the same moment, every daemon but one must exit 1 naming the winner's pid;
    # without the socket lock most trials left two up, one of them orphaned and unreachable.
    import time

    for trial in range(4):
        wd = tmp_path / f"t{trial}"
        wd.mkdir()
        sock = wd / "kv.sock"
        procs = [subprocess.Popen(
            [sys.executable, "-m", "kvstore", "serve", "--socket", str(sock), "--shm-dir",
             str(shm_dir), "--dram-bytes", "16MiB", "--chunk-bytes", "4MiB"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(3)]
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                done = [p for p in procs if p.poll() is not None]
                if len(done) == len(procs) - 1:
                    break
                time.sleep(0.1)
            time.sleep(1.0)      # a second survivor would still be coming up: let it
            alive = [p for p in procs if p.poll() is None]
            assert len(alive) == 1, f"trial {trial}: {len(alive)} daemons up"
            winner = alive[0]
            for p in procs:
                if p is not winner:
                    err = p.stderr.read()
                    assert p.returncode == 1, err
                    assert f"pid {winner.pid}" in err and "another daemon is listening" in err
            # the losers exit once the winner holds the lock, before it listens: on a loaded
            # host its socket can come later than the second above
            while not sock.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            with KVClient(str(sock)) as c:
                assert c.stats().sessions == 1
            assert (wd / "kv.sock.lock").read_text().strip() == str(winner.pid)
            winner.terminate()
            assert winner.wait(30) == 0
            # The winner removed its socket and its lock file; the others never had them.
            assert sorted(x.name for x in wd.iterdir()) == []
            assert not list(shm_dir.glob("*.arena"))
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
                p.stderr.close()


def test_daemon_leaves_a_socket_it_no_longer_owns(daemon_factory, tmp_path):
    # A's socket file and its lock file are removed by hand and B takes the path: stopping A
    # must unlink neither B's socket nor B's lock file.
    a = daemon_factory("--dram-bytes", "64MiB", "--chunk-bytes", "16MiB")
    os.unlink(a.socket)
    os.unlink(a.socket + ".lock")
    b = DaemonProcess(Path(a.socket).parent, a.shm_dir, ["--dram-bytes", "64MiB",
                                                          "--chunk-bytes", "16MiB"])
    b.log_path = tmp_path / "b.log"
    b.start()
    try:
        assert a.stop() == 0
        assert os.path.exists(b.socket)
        with KVClient(b.socket) as c:
            assert c.stats().sessions == 1
        assert "no longer the socket this daemon bound" in a.log()
        assert os.path.exists(b.socket + ".lock")
        assert b.stop() == 0 and not os.path.exists(b.socket)
    finally:
        b.close()


def test_client_reconnects_after_daemon_restart(daemon_factory, tmp_path):
    d = daemon_factory("--dram-bytes", "64MiB", "--chunk-bytes", "16MiB")
    with KVClient(d.socket) as c:
        ns = c.namespace("llama", LAYOUT)
        keys = ns.block_keys(list(range(32)))
        kv = torch.randn(2, *LAYOUT.block_shape).to(torch.bfloat16)
        ns.put(keys, kv).result()
        d.kill()
        with pytest.raises(Exception):
            ns.lookup(keys)
        d.start()
        _wait_for(lambda: _try(lambda: ns.lookup(keys)) is not None, timeout_s=20)
        assert ns.lookup(keys).num_cached == 0   # DRAM does not survive a restart
        assert ns.put(keys, kv).result() == 2
        assert torch.equal(ns.get(keys).result(), kv)
        assert c.reconnects >= 1


def _try(fn):
    try:
        return fn()
    except Exception:
        return None


def _wait_for(cond, timeout_s: float = 10.0):
    import time
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_expired_lease_is_a_stale_read(daemon_factory):
    import time

    from kvstore.client import StaleRead

    d = daemon_factory("--dram-bytes", "64MiB", "--chunk-bytes", "16MiB", "--lease-timeout-s", "1")
    with KVClient(d.socket) as c:
        ns = c.namespace("llama", LAYOUT)
        keys = ns.block_keys(list(range(32)))
        ns.put(keys, torch.zeros(2, *LAYOUT.block_shape, dtype=torch.bfloat16)).result()
        lease = ns.acquire(keys)
        assert len(lease) == 2 and not lease.surely_valid()  # 1 s lease: no margin left
        time.sleep(2.5)                                       # the daemon expires it
        with pytest.raises(StaleRead, match="expired"):
            lease.release()
        assert c.stats().leases_expired == 1 and c.stats().active_leases == 0
