"""Tenants on one daemon, black-box: statistics that cannot be broken or read across tenants,
authentication before decoding, the shared arena only for trusted tenants, token reload.

Real daemon processes, real client processes (the arena test), real TCP sockets.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request

import grpc
import numpy as np
import pytest

from support.net import free_port, tcp_port
from kvstore.client import KVClient
from kvstore.client.errors import InvalidArgument, PermissionDenied
from kvstore.core.errors import REASON_METADATA_KEY, Reason
from kvstore.core.layout import KVLayout
from kvstore.metrics.model import Metrics
from kvstore.metrics.counters import UINT64_MAX
from kvstore.v1 import kvstore_pb2 as pb

LAYOUT = KVLayout(2, 2, 64, block_tokens=16, dtype="float16")   # 16 KiB blocks
TOKENS = {"a": "tenant-a-token-0123456789abcdef", "b": "tenant-b-token-0123456789abcdef",
          "c": "tenant-c-token-0123456789abcdef", "ops": "operator-token-0123456789abcdef"}
UNARY = ["RegisterNamespace", "Lookup", "Allocate", "WriteBlocks", "Commit", "Acquire",
         "Release", "Delete", "GetStats", "ReportFallbacks", "Prefetch", "CancelPrefetch",
         "PlanRecompute"]


def _kv(n: int, fill: float = 1.0) -> np.ndarray:
    return np.full((n, *LAYOUT.block_shape), fill, dtype=np.float16)


def _tokens_file(path, *lines: str):
    path.write_text("".join(line + "\n" for line in lines))
    path.chmod(0o600)
    return path


def _daemon(daemon_factory, tmp_path, *extra: str, lines=None):
    tokens = _tokens_file(tmp_path / "tokens", *(lines or (
        f"{TOKENS['a']} tenant-a", f"{TOKENS['b']} tenant-b", f"{TOKENS['ops']} ops +admin")))
    d = daemon_factory("--dram-bytes", "64MiB", "--chunk-bytes", "4MiB",
                       "--listen", "127.0.0.1:0", "--tokens-file", str(tokens), *extra)
    d.address = f"127.0.0.1:{tcp_port(d)}"
    d.tokens = tokens
    return d


def _client(d, who: str, **kw) -> KVClient:
    kw.setdefault("shared_memory", False)
    return KVClient(address=d.address, token=TOKENS[who], timeout_s=10, **kw)


# -- 8: client-reported counters ----------------------------------------------------------------

def test_reported_fallbacks_cannot_break_statistics(daemon_factory, tmp_path):
    port = free_port()
    d = _daemon(daemon_factory, tmp_path, "--metrics-port", str(port))
    with _client(d, "a") as a:
        for _ in range(2):
            with pytest.raises(InvalidArgument) as exc:
                a.call("ReportFallbacks", pb.ReportFallbacksRequest(count=1, blocks=2**64 - 1))
            assert exc.value.reason == Reason.BAD_ARGUMENT
        with pytest.raises(InvalidArgument):
            a.call("ReportFallbacks", pb.ReportFallbacksRequest(count=2**32 - 1))
        a.call("ReportFallbacks", pb.ReportFallbacksRequest(count=3, blocks=1 << 40))
    with KVClient(d.socket) as local:
        st = local.stats()
        assert (st.recompute_fallbacks, st.recompute_fallback_blocks) == (3, 1 << 40)
        assert next(local.watch_stats(0.05)).recompute_fallbacks == 3
    for path in ("/metrics", "/api/stats"):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            assert r.status == 200
            body = r.read().decode()
        assert (str(1 << 40) if path == "/api/stats" else "1.099511627776e+12") in body, path
    r = subprocess.run([sys.executable, "-m", "kvstore", "stats", "--socket", d.socket],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_counters_saturate_instead_of_overflowing():
    m = Metrics(None, base=pb.Stats)
    for _ in range(3):
        m.fallbacks_reported(1 << 20, 1 << 63)
    st = m.snapshot()
    assert st.recompute_fallback_blocks == UINT64_MAX
    assert st.recompute_fallbacks == 3 << 20
    pb.Stats.FromString(st.SerializeToString())     # still a valid message


# -- 9: authentication before decoding ----------------------------------------------------------

def test_undecodable_requests_are_refused_before_decoding(daemon_factory, tmp_path):
    d = _daemon(daemon_factory, tmp_path)
    garbage = b"\xff\xff\xff\xff\xff"
    with grpc.insecure_channel(d.address) as ch:
        for method in UNARY:
            call = ch.unary_unary(f"/kvstore.v1.KVStore/{method}")   # bytes in, bytes out
            with pytest.raises(grpc.RpcError) as exc:
                call(garbage, timeout=10)
            assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED, method
            assert (REASON_METADATA_KEY, "UNAUTHENTICATED") in tuple(
                exc.value.trailing_metadata()), method
            # With a valid token the same bytes are a clear INVALID_ARGUMENT, not UNKNOWN.
            with pytest.raises(grpc.RpcError) as exc:
                call(garbage, timeout=10, metadata=(("authorization",
                                                     f"Bearer {TOKENS['a']}"),))
            assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
            assert (REASON_METADATA_KEY, "MALFORMED_REQUEST") in tuple(
                exc.value.trailing_metadata()), method
        stream = ch.unary_stream("/kvstore.v1.KVStore/OpenSession")
        with pytest.raises(grpc.RpcError) as exc:
            list(stream(garbage, timeout=10))
        assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with KVClient(d.socket) as local:
        assert local.stats().auth_failures == len(UNARY) + 1
    log = d.log()
    assert "Traceback" not in log and "DecodeError" not in log
    assert log.count("refused a call from") == len(UNARY) + 1


# -- 10: the shared arena only for trusted tenants ----------------------------------------------

_PROC = textwrap.dedent("""
    import json, sys
    import numpy as np
    from kvstore.client import KVClient, KVLayout
    from kvstore.client.errors import KVStoreError
    from kvstore.core.keys import pack_keys
    from kvstore.v1 import kvstore_pb2 as pb
    address, token, tenant, mode = sys.argv[1:5]
    layout = KVLayout(2, 2, 64, block_tokens=16, dtype="float16")
    out = {}
    with KVClient(address=address, token=token, timeout_s=20) as c:   # shared memory if offered
        out["shared_memory"] = c.shared_memory
        out["arena_path"] = c._session.event.arena.path
        out["hbm_offered"] = c._session.event.HasField("hbm")
        ns = c.namespace("llama", layout, tenant=tenant)
        keys = ns.block_keys(np.arange(16 * 4))
        kv = np.full((4, *layout.block_shape), 3.0 if mode == "a" else 4.0, dtype=np.float16)
        alloc = c.call("Allocate", pb.AllocateRequest(
            session_id=c.session_id, namespace_id=ns.namespace_id,
            keys=pack_keys(ns.block_keys(np.arange(16 * 2) + 99999))))
        out["alloc_offsets"] = list(alloc.offsets)
        c.call("Commit", pb.CommitRequest(session_id=c.session_id,
                                          allocation_id=alloc.allocation_id, abort=True))
        out["put"] = ns.put(keys, kv).result()
        got = np.asarray(ns.get(keys).result())
        out["get_ok"] = bool(np.array_equal(got, kv))
        lease = ns.acquire(keys)
        out["acquire_offsets"] = list(lease.offsets)
        lease.release()
        try:
            c.call("Acquire", pb.AcquireRequest(session_id=c.session_id,
                                                namespace_id=ns.namespace_id,
                                                keys=pack_keys(keys), want_hbm=True))
            out["want_hbm"] = "ok"
        except KVStoreError as exc:
            out["want_hbm"] = exc.reason.value
    print(json.dumps(out))
""")


def test_shared_arena_only_for_trusted_tenants(daemon_factory, tmp_path):
    d = _daemon(daemon_factory, tmp_path, "--arena-tenants", "tenant-a")
    script = tmp_path / "tenant_client.py"
    script.write_text(_PROC)

    def run(who: str) -> dict:
        r = subprocess.run([sys.executable, str(script), d.address, TOKENS[who],
                            f"tenant-{who}", who], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout.strip().splitlines()[-1])

    a, b = run("a"), run("b")
    # tenant-a is listed in arena_tenants: it maps the arena and gets real slot offsets.
    assert a["shared_memory"] and a["arena_path"] and a["get_ok"] and a["put"] == 4
    assert any(o > 0 for o in a["acquire_offsets"] + a["alloc_offsets"])
    # tenant-b is not: no arena, no HBM pool, no slot offsets, HBM requests refused; its bytes
    # still round-trip over gRPC.
    assert not b["shared_memory"] and b["arena_path"] == "" and not b["hbm_offered"]
    assert b["put"] == 4 and b["get_ok"]
    assert b["alloc_offsets"] == [0, 0] and b["acquire_offsets"] == [0, 0, 0, 0]
    assert b["want_hbm"] == Reason.ARENA_NOT_TRUSTED.value
    # The socket's owner is trusted as before.
    with KVClient(d.socket) as local:
        assert local.shared_memory


# -- 11: statistics per tenant --------------------------------------------------------------

def test_tenant_statistics_show_only_their_own(daemon_factory, tmp_path):
    d = _daemon(daemon_factory, tmp_path)
    a, b = _client(d, "a"), _client(d, "b")
    try:
        ns_a = a.namespace("llama", LAYOUT, tenant="tenant-a")
        keys = ns_a.block_keys(np.arange(16 * 4))
        assert ns_a.put(keys, _kv(4)).result() == 4
        for _ in range(5):
            ns_a.lookup(keys)
        held = ns_a.acquire(keys)
        b.namespace("llama", LAYOUT, tenant="tenant-b")
        with pytest.raises(PermissionDenied) as exc:
            b.namespace("llama", LAYOUT, tenant="tenant-a")
        assert exc.value.reason == Reason.TENANT_DENIED
        for st in (b.stats(), next(b.watch_stats(0.05))):
            assert [n.tenant for n in st.namespaces] == ["tenant-b"]
            assert st.lookups == 0 and st.active_leases == 0 and st.sessions == 1
            assert all(t.used_bytes == 0 and t.blocks == 0 and t.hits == 0 and t.bytes_in == 0
                       for t in st.tiers)
            assert st.tiers and all(t.capacity_bytes > 0 for t in st.tiers)
        st = a.stats()
        assert st.active_leases == 1 and st.sessions == 1
        assert [(n.tenant, n.blocks) for n in st.namespaces] == [("tenant-a", 4)]
        # `kvstore stats` over TCP with B's token: B's view.
        tok = tmp_path / "b.token"
        tok.write_text(TOKENS["b"])
        r = subprocess.run([sys.executable, "-m", "kvstore", "stats", "--json", "--address",
                            d.address, "--token-file", str(tok)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        view = json.loads(r.stdout)
        assert not view.get("lookups") and {n["tenant"] for n in view["namespaces"]} == {
            "tenant-b"}
        # An admin token (+admin in the tokens file) and the socket's owner see everything.
        with _client(d, "ops") as ops, KVClient(d.socket) as local:
            for st in (ops.stats(), local.stats()):
                assert st.lookups >= 5 and st.active_leases == 1 and st.sessions >= 3
                assert {n.tenant for n in st.namespaces} == {"tenant-a", "tenant-b"}
        held.release()
    finally:
        a.close()
        b.close()


# -- 12: SIGHUP reloads the tokens file ---------------------------------------------------------

def _wait_log(d, text: str, count: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while d.log().count(text) < count:
        assert time.monotonic() < deadline, f"no {text!r} in the log:\n{d.log()}"
        time.sleep(0.05)


def test_sighup_reloads_the_tokens_file(daemon_factory, tmp_path):
    d = _daemon(daemon_factory, tmp_path)
    a = _client(d, "a")
    try:
        ns = a.namespace("llama", LAYOUT, tenant="tenant-a")
        keys = ns.block_keys(np.arange(16))
        assert ns.put(keys, _kv(1)).result() == 1
        with pytest.raises(PermissionDenied):
            _client(d, "c")
        # Revoke a, add c.
        _tokens_file(d.tokens, f"{TOKENS['b']} tenant-b", f"{TOKENS['c']} tenant-c")
        os.kill(d.proc.pid, signal.SIGHUP)
        _wait_log(d, "SIGHUP: reloaded 2 bearer tokens", 1)
        with pytest.raises(PermissionDenied) as exc:     # the client that was in: refused now
            ns.lookup(keys)
        assert exc.value.reason == Reason.UNAUTHENTICATED
        with pytest.raises(PermissionDenied):
            _client(d, "a")
        with _client(d, "c") as c:
            assert c.namespace("m", LAYOUT, tenant="tenant-c").lookup(keys).num_cached == 0
        # A broken file on SIGHUP keeps the tokens in force (and says why).
        d.tokens.write_text("short tenant-x\n")
        os.kill(d.proc.pid, signal.SIGHUP)
        _wait_log(d, "SIGHUP: keeping the 2 tokens in force", 1)
        with _client(d, "b") as b:
            b.namespace("m", LAYOUT, tenant="tenant-b")
        assert d.proc.poll() is None
    finally:
        a.close()


def test_arena_tenants_config_key(tmp_path):
    from kvstore.daemon.config import ConfigError, load_config

    toml = tmp_path / "kv.toml"
    toml.write_text('arena_tenants = ["team-a", "team-b"]\n')
    assert load_config(toml, env={}).arena_tenants == ("team-a", "team-b")
    assert load_config(env={"KVSTORE_ARENA_TENANTS": "team-a, team-c"}).arena_tenants == (
        "team-a", "team-c")
    assert load_config(env={}).arena_tenants == ()
    toml.write_text("arena_tenants = 3\n")
    with pytest.raises(ConfigError, match="arena_tenants"):
        load_config(toml, env={})
