"""Structured errors: every refusal carries a machine-readable reason, and the SDK acts on it.

The first test drives a real daemon into each reason it can answer and checks that the reason
reaches the client (as ``exc.reason`` and as the ``kvstore-reason`` trailing metadata). The
second pins the SDK's side of the contract: its decisions (register again and retry, discard a
read) follow the reason alone, whatever the message says. The real daemon's wording cannot be
changed at run time, so that test answers from a small gRPC server speaking kvstore.v1 with
chosen messages and reasons.
"""
from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest

from kvstore.client import KVClient
from kvstore.client.errors import (FailedPrecondition, InvalidArgument, NotFound,
                                   ResourceExhausted, StaleRead)
from kvstore.core.errors import REASON_METADATA_KEY, Reason
from kvstore.core.keys import namespace_digest, pack_keys
from kvstore.core.layout import KVLayout
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc

LAYOUT = KVLayout(2, 2, 64, block_tokens=16, dtype="float16")        # 16 KiB blocks
BIG = KVLayout(16, 8, 64, block_tokens=32, dtype="float16")          # 1 MiB blocks


def _kv(layout: KVLayout, n: int, fill: float = 1.0) -> np.ndarray:
    return np.full((n, *layout.block_shape), fill, dtype=np.float16)


def _reason(call, *args):
    """The SDK exception of a call expected to fail."""
    with pytest.raises(Exception) as exc:
        call(*args)
    return exc.value


def test_each_reason_reaches_the_client(daemon_factory):
    d = daemon_factory("--dram-bytes", "64MiB", "--chunk-bytes", "4MiB",
                       "--max-batch-blocks", "128", "--lease-timeout-s", "1",
                       "--max-inflight-requests-per-client", "4",
                       "--max-inflight-bytes-per-client", "1GiB")
    with KVClient(d.socket, timeout_s=10) as c:
        ns = c.namespace("m", LAYOUT)
        keys = ns.block_keys(np.arange(16 * 4))
        assert ns.put(keys, _kv(LAYOUT, 4)).result() == 4
        sid, blob = c.session_id, pack_keys(keys)
        cases = {
            Reason.UNKNOWN_SESSION: (NotFound, "Allocate", pb.AllocateRequest(
                session_id=sid + 999, namespace_id=ns.namespace_id, keys=blob)),
            Reason.UNKNOWN_NAMESPACE: (NotFound, "Lookup", pb.LookupRequest(
                namespace_id=bytes(16), keys=blob)),
            Reason.LAYOUT_MISMATCH: (FailedPrecondition, "RegisterNamespace",
                                     pb.RegisterNamespaceRequest(
                                         model_id="m", layout=BIG.to_proto(pb))),
            Reason.BAD_LAYOUT: (InvalidArgument, "RegisterNamespace", pb.RegisterNamespaceRequest(
                model_id="x", layout=pb.KVLayout(num_layers=0, num_kv_heads=1, head_dim=1,
                                                 block_tokens=1, dtype="float16"))),
            Reason.BAD_KEYS: (InvalidArgument, "Lookup", pb.LookupRequest(
                namespace_id=ns.namespace_id, keys=b"x" * 15)),
            Reason.BATCH_TOO_LARGE: (InvalidArgument, "Lookup", pb.LookupRequest(
                namespace_id=ns.namespace_id, keys=bytes(16 * 129))),
            Reason.UNKNOWN_LEASE: (FailedPrecondition, "Release", pb.ReleaseRequest(
                session_id=sid, lease_id=424242)),
            Reason.UNKNOWN_ALLOCATION: (FailedPrecondition, "Commit", pb.CommitRequest(
                session_id=sid, allocation_id=424242)),
            Reason.BAD_ARGUMENT: (InvalidArgument, "PlanRecompute", pb.PlanRecomputeRequest(
                namespace_id=ns.namespace_id, keys=blob, latency_s=-1.0)),
        }
        for reason, (cls, method, req) in cases.items():
            err = _reason(c.call, method, req)
            assert isinstance(err, cls) and err.reason == reason, (reason, type(err), err)
        # The reason is on the wire as trailing metadata, for clients in any language.
        with pytest.raises(grpc.RpcError) as exc:
            c._stub.Lookup(pb.LookupRequest(namespace_id=bytes(16), keys=blob), timeout=5)
        assert (REASON_METADATA_KEY, "UNKNOWN_NAMESPACE") in tuple(exc.value.trailing_metadata())

        # A request whose bytes do not parse: INVALID_ARGUMENT, MALFORMED_REQUEST.
        raw = c._channel.unary_unary("/kvstore.v1.KVStore/Lookup")
        with pytest.raises(grpc.RpcError) as exc:
            raw(b"\xff\xff\xff\xff", timeout=5)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (REASON_METADATA_KEY, "MALFORMED_REQUEST") in tuple(exc.value.trailing_metadata())

        # EXPIRED_LEASE: the SDK raises StaleRead, from the reason.
        lease = ns.acquire(keys)
        time.sleep(2.5)                           # lease_timeout_s 1 + the 1 s expiry sweep
        with pytest.raises(StaleRead) as exc:
            lease.release()
        assert exc.value.reason == Reason.EXPIRED_LEASE

        # OVER_LIMIT: more puts/gets in flight than max_inflight_requests_per_client.
        held = [ns.acquire(keys) for _ in range(4)]
        err = _reason(ns.acquire, keys)
        assert isinstance(err, ResourceExhausted) and err.reason == Reason.OVER_LIMIT, err
        for lease in held:
            lease.release()

        # NO_ROOM: every slot leased, nothing to evict.
        big = c.namespace("big", BIG)
        bkeys = big.block_keys(np.arange(32 * 80))
        stored = big.put(bkeys, _kv(BIG, 80)).result()
        assert 0 < stored < 80
        full = big.acquire(bkeys[:stored])
        more = big.block_keys(np.arange(32 * 4) + 7)
        err = _reason(lambda: big.put(more, _kv(BIG, 4)).result())
        assert isinstance(err, ResourceExhausted) and err.reason == Reason.NO_ROOM, err
        full.release()


# -- the SDK decides by reason, not by wording -----------------------------------------------

class _ScriptedDaemon(pb_grpc.KVStoreServicer):
    """Speaks kvstore.v1; Lookup and Release fail once with a chosen (message, reason)."""

    def __init__(self):
        self.registered = 0
        self.lookups = 0
        self.lookup_error: tuple[grpc.StatusCode, str, str | None] | None = None
        self.release_error: tuple[grpc.StatusCode, str, str | None] | None = None
        self.stop = threading.Event()

    def OpenSession(self, request, context):
        yield pb.SessionEvent(session_id=7, max_batch_blocks=64, max_message_bytes=4 << 20)
        self.stop.wait(30)

    def RegisterNamespace(self, request, context):
        self.registered += 1
        layout = KVLayout.from_proto(request.layout)
        return pb.RegisterNamespaceResponse(
            namespace_id=namespace_digest(request.model_id, layout, request.tenant),
            block_bytes=layout.block_bytes, slot_bytes=layout.slot_bytes)

    def Lookup(self, request, context):
        self.lookups += 1
        if self.lookup_error:
            err, self.lookup_error = self.lookup_error, None
            _fail(context, *err)
        return pb.LookupResponse(num_cached=3, tiers=[pb.TIER_DRAM] * 3)

    def Acquire(self, request, context):
        return pb.AcquireResponse(lease_id=5, offsets=[0], tiers=[pb.TIER_DRAM],
                                  lease_timeout_s=30)

    def Release(self, request, context):
        if self.release_error:
            _fail(context, *self.release_error)
        return pb.ReleaseResponse()


def _fail(context, code, message, reason):
    if reason:
        context.set_trailing_metadata(((REASON_METADATA_KEY, reason),))
    context.abort(code, message)


@pytest.fixture
def scripted(tmp_path):
    servicer = _ScriptedDaemon()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    pb_grpc.add_KVStoreServicer_to_server(servicer, server)
    sock = tmp_path / "scripted.sock"
    server.add_insecure_port(f"unix:{sock}")
    server.start()
    client = KVClient(str(sock), timeout_s=5)
    yield servicer, client
    servicer.stop.set()
    client.close()
    server.stop(0)


def test_sdk_reregisters_on_the_reason_not_the_wording(scripted):
    daemon, c = scripted
    ns = c.namespace("m", LAYOUT)
    keys = ns.block_keys(np.arange(16 * 3))
    assert daemon.registered == 1
    # A reason without the words the SDK once looked for: it registers again and retries.
    daemon.lookup_error = (grpc.StatusCode.NOT_FOUND, "zzz", "UNKNOWN_NAMESPACE")
    assert ns.lookup(keys).num_cached == 3
    assert daemon.registered == 2 and daemon.lookups == 2
    daemon.lookup_error = (grpc.StatusCode.NOT_FOUND, "qqq", "UNKNOWN_SESSION")
    assert ns.lookup(keys).num_cached == 3
    assert daemon.registered == 3
    # The old words without the reason: an ordinary NOT_FOUND, not retried.
    daemon.lookup_error = (grpc.StatusCode.NOT_FOUND, "unknown namespace 00: register it first",
                           None)
    with pytest.raises(NotFound) as exc:
        ns.lookup(keys)
    assert exc.value.reason == Reason.UNSPECIFIED and daemon.registered == 3


def test_sdk_discards_a_read_on_the_reason_not_the_wording(scripted):
    daemon, c = scripted
    ns = c.namespace("m", LAYOUT)
    keys = ns.block_keys(np.arange(16))
    daemon.release_error = (grpc.StatusCode.FAILED_PRECONDITION, "zzz", "EXPIRED_LEASE")
    with pytest.raises(StaleRead):
        ns.acquire(keys).release()
    daemon.release_error = (grpc.StatusCode.FAILED_PRECONDITION, "lease 5 expired after 30s",
                            "UNKNOWN_LEASE")
    with pytest.raises(FailedPrecondition) as exc:
        ns.acquire(keys).release()
    assert not isinstance(exc.value, StaleRead) and exc.value.reason == Reason.UNKNOWN_LEASE

