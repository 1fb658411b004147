"""Access control of a real daemon: socket modes, bearer tokens, TLS, tenants, client limits."""
from __future__ import annotations

import datetime
import grp
import ipaddress
import json
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvstore.testing.daemon import DaemonProcess
from support.net import tcp_port
from kvstore.client import KVClient
from kvstore.client.errors import (NotFound, PermissionDenied, ResourceExhausted)
from kvstore.core.keys import pack_keys
from kvstore.core.layout import KVLayout
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc

LAYOUT = KVLayout(2, 2, 64, block_tokens=16, dtype="float16")   # 16 KiB blocks
TOKEN = "t0ken-for-the-default-tenant-0123"
TOKENS = {"a": "tenant-a-token-0123456789abcdef", "b": "tenant-b-token-0123456789abcdef",
          "c": "tenant-c-token-0123456789abcdef", "d": "tenant-d-token-0123456789abcdef"}


def _kv(n: int, fill: float = 1.0) -> np.ndarray:
    return np.full((n, *LAYOUT.block_shape), fill, dtype=np.float16)


def test_socket_is_0600_by_default(daemon):
    st = os.stat(daemon.socket)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600


def test_socket_0660_with_group(daemon_factory):
    group = grp.getgrgid(os.getgid()).gr_name
    d = daemon_factory("--dram-bytes", "64MiB", "--chunk-bytes", "4MiB", "--socket-group", group)
    st = os.stat(d.socket)
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == os.getgid()


def _tcp_daemon(daemon_factory, *extra: str, env: dict | None = None):
    return daemon_factory("--dram-bytes", "64MiB", "--chunk-bytes", "4MiB",
                          "--listen", "127.0.0.1:0", *extra, env=env)


def test_tcp_requires_a_valid_token(daemon_factory):
    d = _tcp_daemon(daemon_factory, env={"KVSTORE_AUTH_TOKEN": TOKEN})
    addr = f"127.0.0.1:{tcp_port(d)}"
    with grpc.insecure_channel(addr) as ch:
        stub = pb_grpc.KVStoreStub(ch)
        for md, why in ((None, "missing bearer token"),
                        ((("authorization", "Bearer wrong-token-wrong-token"),), "invalid"),
                        ((("authorization", f"Basic {TOKEN}"),), "invalid")):
            with pytest.raises(grpc.RpcError) as exc:
                stub.GetStats(pb.GetStatsRequest(), timeout=5, metadata=md)
            assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED, md
            assert why in exc.value.details()
        # Kubernetes gRPC probes carry no token: health is exempt.
        r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert r.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(PermissionDenied):
        KVClient(address=addr, token="wrong-token-wrong-token", timeout_s=5)
    with KVClient(address=addr, token=TOKEN, shared_memory=False) as c:
        ns = c.namespace("m", LAYOUT)
        keys = ns.block_keys(np.arange(64))
        assert ns.put(keys, _kv(4, 2.0)).result() == 4
        assert np.array_equal(np.asarray(ns.get(keys).result()), _kv(4, 2.0))
        assert c.stats().auth_failures >= 3


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kvstore-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


def test_tls_listener(daemon_factory, tmp_path):
    cert, key = _self_signed(tmp_path)
    d = _tcp_daemon(daemon_factory, "--tls-cert-file", str(cert), "--tls-key-file", str(key),
                    env={"KVSTORE_AUTH_TOKEN": TOKEN})
    port = tcp_port(d)
    assert "(TLS)" in d.log()
    with KVClient(address=f"localhost:{port}", token=TOKEN, tls_ca_file=str(cert),
                  shared_memory=False) as c:
        ns = c.namespace("m", LAYOUT)
        keys = ns.block_keys(np.arange(32))
        assert ns.put(keys, _kv(2, 3.0)).result() == 2
        assert np.array_equal(np.asarray(ns.get(keys).result()), _kv(2, 3.0))
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    r = subprocess.run([sys.executable, "-m", "kvstore", "stats", "--json", "--address",
                        f"localhost:{port}", "--token-file", str(token_file), "--tls-ca",
                        str(cert)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tiers"][0]["blocks"] == 2
    creds = grpc.ssl_channel_credentials(cert.read_bytes())
    with grpc.secure_channel(f"localhost:{port}", creds) as ch:   # TLS, but no token
        with pytest.raises(grpc.RpcError) as exc:
            pb_grpc.KVStoreStub(ch).GetStats(pb.GetStatsRequest(), timeout=5)
        assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:         # plaintext to a TLS port
        with pytest.raises(grpc.RpcError) as exc:
            pb_grpc.KVStoreStub(ch).GetStats(
                pb.GetStatsRequest(), timeout=3, metadata=(("authorization", f"Bearer {TOKEN}"),))
        assert exc.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


@pytest.fixture
def tenant_daemon(daemon_factory, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("# token tenant [shared salts]\n"
                      f"{TOKENS['a']} tenant-a\n{TOKENS['b']} tenant-b\n"
                      f"{TOKENS['c']} tenant-c shared-llama\n{TOKENS['d']} tenant-d shared-llama\n")
    tokens.chmod(0o600)
    d = _tcp_daemon(daemon_factory, "--tokens-file", str(tokens))
    d.address = f"127.0.0.1:{tcp_port(d)}"
    return d


def _client(d, who: str) -> KVClient:
    return KVClient(address=d.address, token=TOKENS[who], shared_memory=False, timeout_s=10)


def test_tenants_cannot_probe_read_or_delete_each_other(tenant_daemon):
    d = tenant_daemon
    a, b = _client(d, "a"), _client(d, "b")
    try:
        ns_a = a.namespace("llama", LAYOUT, tenant="tenant-a")
        keys_a = ns_a.block_keys(np.arange(16 * 4))
        assert ns_a.put(keys_a, _kv(4, 7.0)).result() == 4

        with pytest.raises(PermissionDenied, match="may not use tenant 'tenant-a'"):
            b.namespace("llama", LAYOUT, tenant="tenant-a")
        with pytest.raises(PermissionDenied):
            b.namespace("llama", LAYOUT)           # the default tenant is not b's either
        ns_b = b.namespace("llama", LAYOUT, tenant="tenant-b")
        assert ns_b.namespace_id != ns_a.namespace_id   # the tenant salt enters every key
        assert ns_b.lookup(ns_b.block_keys(np.arange(16 * 4))).num_cached == 0

        # B with A's namespace id and keys: exactly the answer for a namespace that does not
        # exist (same status, same message shape) — no existence oracle.
        blob = pack_keys(keys_a)
        made_up = bytes(16)
        sid = b.session_id
        for method, make in (
            ("Lookup", lambda ns: pb.LookupRequest(namespace_id=ns, keys=blob)),
            ("Acquire", lambda ns: pb.AcquireRequest(session_id=sid, namespace_id=ns, keys=blob)),
            ("Delete", lambda ns: pb.DeleteRequest(namespace_id=ns, keys=blob)),
            ("Allocate", lambda ns: pb.AllocateRequest(session_id=sid, namespace_id=ns, keys=blob)),
        ):
            errors = []
            for ns_id in (ns_a.namespace_id, made_up):
                with pytest.raises(NotFound) as exc:
                    b.call(method, make(ns_id))
                errors.append(str(exc.value).replace(ns_id.hex(), "<ns>"))
            assert errors[0] == errors[1], (method, errors)

        # Nor by timing: interleaved calls, median latency of each kind within noise.
        times = {ns_a.namespace_id: [], made_up: []}
        req = {k: pb.LookupRequest(namespace_id=k, keys=blob) for k in times}
        for _ in range(150):
            for k in times:
                t0 = time.perf_counter()
                with pytest.raises(NotFound):
                    b.call("Lookup", req[k])
                times[k].append(time.perf_counter() - t0)
        med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        ratio = med[ns_a.namespace_id] / med[made_up]
        assert 0.7 < ratio < 1.43, f"foreign/unknown median latency ratio {ratio:.2f}"

        # B cannot ride on A's session (lease and allocation ids are per session).
        lease = ns_a.acquire(keys_a)
        with pytest.raises(NotFound, match="unknown session"):
            b.call("Release", pb.ReleaseRequest(session_id=lease.session_id,
                                                lease_id=lease.lease_id))
        stream = b._stub.ReadBlocks(pb.ReadBlocksRequest(session_id=lease.session_id,
                                                         lease_id=lease.lease_id),
                                    metadata=b._metadata, timeout=5)
        with pytest.raises(grpc.RpcError) as exc:
            list(stream)
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND
        lease.release()

        # A's blocks are intact; B's statistics do not show A's namespace.
        assert ns_a.lookup(keys_a).num_cached == 4
        assert np.array_equal(np.asarray(ns_a.get(keys_a).result()), _kv(4, 7.0))
        assert {n.tenant for n in b.stats().namespaces} == {"tenant-b"}
        assert {n.tenant for n in a.stats().namespaces} == {"tenant-a"}
        assert {n.tenant for n in next(b.watch_stats(0.05)).namespaces} == {"tenant-b"}
    finally:
        a.close()
        b.close()
    # A trusted local client on the 0600 socket sees every tenant.
    with KVClient(d.socket) as local:
        assert {n.tenant for n in local.stats().namespaces} == {"tenant-a", "tenant-b"}


def test_prefix_sharing_across_tenants_only_when_configured(tenant_daemon):
    d = tenant_daemon
    c, dd, a = _client(d, "c"), _client(d, "d"), _client(d, "a")
    try:
        ns_c = c.namespace("llama", LAYOUT, tenant="shared-llama")
        keys = ns_c.block_keys(np.arange(16 * 3))
        assert ns_c.put(keys, _kv(3, 5.0)).result() == 3
        ns_d = dd.namespace("llama", LAYOUT, tenant="shared-llama")
        assert ns_d.namespace_id == ns_c.namespace_id
        assert ns_d.lookup(keys).num_cached == 3
        assert np.array_equal(np.asarray(ns_d.get(keys).result()), _kv(3, 5.0))
        with pytest.raises(PermissionDenied):
            a.namespace("llama", LAYOUT, tenant="shared-llama")
        with pytest.raises(NotFound):
            a.call("Lookup", pb.LookupRequest(namespace_id=ns_c.namespace_id,
                                              keys=pack_keys(keys)))
    finally:
        for x in (c, dd, a):
            x.close()


def test_tokens_file_errors(daemon_factory, tmp_path):
    f = tmp_path / "tokens"
    f.write_text("short tenant-a\n")
    f.chmod(0o600)
    with pytest.raises(RuntimeError, match="line 1: token is 5 characters"):
        _tcp_daemon(daemon_factory, "--tokens-file", str(f))
    f.write_text(f"{TOKENS['a']} tenant-a\n")
    f.chmod(0o644)
    with pytest.raises(RuntimeError, match="readable by every user"):
        _tcp_daemon(daemon_factory, "--tokens-file", str(f))


def test_client_limits_and_a_flooder_cannot_starve_others(daemon_factory):
    d = daemon_factory("--dram-bytes", "64MiB", "--chunk-bytes", "4MiB",
                       "--max-inflight-requests-per-client", "8",
                       "--max-inflight-bytes-per-client", "2MiB")
    flooder, normal = KVClient(d.socket), KVClient(d.socket)
    ns_f = flooder.namespace("flood", LAYOUT)
    ns_n = normal.namespace("normal", LAYOUT)
    sid = flooder.session_id
    bb = LAYOUT.block_bytes

    # Bytes: one put bigger than the client's budget is refused outright.
    big = ns_f.block_keys(np.arange(16 * ((2 << 20) // bb + 1)))
    with pytest.raises(ResourceExhausted, match="max_inflight_bytes_per_client"):
        flooder.call("Allocate", pb.AllocateRequest(session_id=sid,
                                                    namespace_id=ns_f.namespace_id,
                                                    keys=pack_keys(big)))
    # Requests: the flooder opens puts and never commits them; the 9th is refused.
    held = []
    for i in range(8):
        keys = ns_f.block_keys(np.arange(16 * 2) + 100000 * (i + 1))
        held.append(flooder.call("Allocate", pb.AllocateRequest(
            session_id=sid, namespace_id=ns_f.namespace_id, keys=pack_keys(keys))))
    with pytest.raises(ResourceExhausted, match="max_inflight_requests_per_client=8"):
        flooder.call("Allocate", pb.AllocateRequest(
            session_id=sid, namespace_id=ns_f.namespace_id,
            keys=pack_keys(ns_f.block_keys(np.arange(16) + 999))))

    # Meanwhile threads of the flooder keep hammering; the normal client is served throughout.
    stop = threading.Event()
    refused = [0]

    def flood():
        keys = pack_keys(ns_f.block_keys(np.arange(16 * 8) + 7))
        while not stop.is_set():
            try:
                flooder.call("Allocate", pb.AllocateRequest(
                    session_id=sid, namespace_id=ns_f.namespace_id, keys=keys))
            except ResourceExhausted:
                refused[0] += 1
    threads = [threading.Thread(target=flood) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for r in range(20):
            keys = ns_n.block_keys(np.arange(16 * 16) + 1000 * r)
            assert ns_n.put(keys, _kv(16, float(r))).result(timeout=10) == 16
            out = np.asarray(ns_n.get(keys).result(timeout=10))
            assert out.shape[0] == 16 and float(out.flat[0]) == float(r)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert refused[0] > 0
    # Finishing outstanding puts frees the budget again.
    for a in held:
        flooder.call("Commit", pb.CommitRequest(session_id=sid, allocation_id=a.allocation_id))
    flooder.call("Allocate", pb.AllocateRequest(
        session_id=sid, namespace_id=ns_f.namespace_id,
        keys=pack_keys(ns_f.block_keys(np.arange(16) + 999))))
    assert normal.stats().requests_throttled >= refused[0] + 2
    flooder.close()
    normal.close()


class _HealthProbedDaemon(DaemonProcess):
    """conftest's readiness check calls GetStats without a token; probe grpc health instead."""

    def _healthy(self) -> bool:
        try:
            with grpc.insecure_channel(f"unix:{self.socket}") as ch:
                r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                         timeout=1)
            return r.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            return False


def test_socket_can_require_a_token(tmp_path, shm_dir):
    d = _HealthProbedDaemon(tmp_path, shm_dir, ["--dram-bytes", "64MiB", "--chunk-bytes", "4MiB",
                                                "--socket-requires-token", "true"],
                            env={"KVSTORE_AUTH_TOKEN": TOKEN})
    try:
        d.start()
        with pytest.raises(PermissionDenied, match="missing bearer token"):
            KVClient(d.socket, timeout_s=5)
        with KVClient(d.socket, token=TOKEN) as c:
            ns = c.namespace("m", LAYOUT)
            keys = ns.block_keys(np.arange(16))
            assert ns.put(keys, _kv(1)).result() == 1
            assert c.shared_memory      # a token changes who you are, not how bytes move
    finally:
        d.close()


def test_refused_calls_are_counted_exactly_and_logged_rate_limited(daemon_factory):
    # 2,000 calls without a token from one host: auth_failures counts every one; the log gets
    # the first few one by one and then one line with the count of the rest, instead of a
    # ~160-byte line per call (about 320 KB here).
    from kvstore.access.interceptor import REFUSAL_LOG_INTERVAL_S, REFUSALS_LOGGED
    import re

    d = _tcp_daemon(daemon_factory, env={"KVSTORE_AUTH_TOKEN": TOKEN})
    addr = f"127.0.0.1:{tcp_port(d)}"
    before = len(d.log().encode())
    n = 2000
    t0 = time.monotonic()
    for _ in range(2):           # two connections: two ports, one peer host
        with grpc.insecure_channel(addr) as ch:
            stub = pb_grpc.KVStoreStub(ch)
            for _ in range(n // 2):
                with pytest.raises(grpc.RpcError) as exc:
                    stub.GetStats(pb.GetStatsRequest(), timeout=5)
                assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
    sent_s = time.monotonic() - t0
    with KVClient(address=addr, token=TOKEN, shared_memory=False) as c:
        assert c.stats().auth_failures == n
    # Every refusal is either a line of its own or in a summary's count, once its window ends.
    deadline = time.monotonic() + REFUSAL_LOG_INTERVAL_S + 10
    while True:
        log = d.log()
        one_by_one = log.count("refused a call from ipv4:127.0.0.1:")
        summed = sum(int(m) for m in re.findall(
            r"refused (\d+) more calls from ipv4:127\.0\.0\.1 in", log))
        if one_by_one + summed == n or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert one_by_one + summed == n, (one_by_one, summed)
    windows = int(sent_s // REFUSAL_LOG_INTERVAL_S) + 2
    assert one_by_one <= REFUSALS_LOGGED * windows
    grown = len(log.encode()) - before
    print(f"{n} refused calls in {sent_s:.1f}s: {grown} bytes of log ({one_by_one} lines one "
          f"by one, {summed} summed)")
    assert grown < 4000 * windows, grown
