"""KV events from real daemons: what a subscriber rebuilds from the stream is exactly what the
daemon holds per tier, through puts, an eviction DRAM -> SSD, deletes and a restart; replay,
snapshots, tenant restriction, and a stalled subscriber that blocks nothing."""
from __future__ import annotations

import time
import urllib.request

import numpy as np
import pytest
import zmq

from kvstore.client import KVClient
from kvstore.events import wire
from kvstore.events.subscriber import EventSubscriber
from support.events import TierView, endpoints, event_args, follow, truth
from support.net import free_port
from support.ssd import LAYOUT, SMALL_DRAM, get_exact, put_chain, ssd_args


def _stats(client):
    return client.stats()


def test_stream_matches_every_tier_across_eviction_delete_and_restart(daemon_factory, tmp_path):
    pub, replay = endpoints()
    d = daemon_factory(*ssd_args(tmp_path / "ssd", "32MiB"), *event_args(pub, replay))
    view = TierView()
    with EventSubscriber(pub, replay) as sub, KVClient(d.socket) as client:
        for _, batch in sub.sync():
            view.apply_batch(batch)
        assert view.cleared == 1 and not view.held("CPU") and not view.held("STORAGE")
        ns = client.namespace("m", LAYOUT)
        a, _ = put_chain(ns, 1, 100)
        follow(sub, view, lambda: view.held("CPU") == set(a) == view.held("STORAGE"))
        # each chain is announced with its parent: the SDK's chain order
        assert [view.parents[k] for k in a[1:]] == a[:-1] and view.parents[a[0]] is None
        b, b_data = put_chain(ns, 2, 100)
        c, _ = put_chain(ns, 3, 100)            # DRAM holds 256 blocks: A's go down to SSD only
        ns.delete(c[50:])
        keys = a + b + c
        want = truth(ns, keys)
        assert want["STORAGE"] == set(a) | set(b) | set(c[:50])
        assert set(a) - want["CPU"], "no block was demoted: the test proves nothing"
        follow(sub, view, lambda: {m: view.held(m) for m in want} == want)
        assert get_exact(ns, b, b_data) == 100
        seq_before = sub.next_seq

        assert d.stop() == 0                    # the publisher thread ends with the daemon
        d.start()
        # The restarted daemon numbers above its predecessor: the subscriber sees a gap no
        # replay can fill and rebuilds from a snapshot (the recovered SSD blocks).
        follow(sub, view, lambda: sub.snapshots >= 2 and view.held("STORAGE") == want["STORAGE"])
        assert sub.next_seq > seq_before
        assert view.held("CPU") == set()
        assert _stats(client).kv_events_dropped == 0
        assert _stats(client).kv_events_published > 0


def test_replay_fills_a_gap_and_snapshot_rebuilds_a_late_router(daemon_factory):
    pub, replay = endpoints()
    d = daemon_factory(*SMALL_DRAM, *event_args(pub, replay))
    with KVClient(d.socket) as client:
        ns = client.namespace("m", LAYOUT)
        chains = [put_chain(ns, s, 4)[0] for s in range(3)]
        # A router that starts now: from the daemon alone, it knows every block, in order.
        with EventSubscriber(pub, replay) as sub:
            view = TierView()
            snap = sub.sync()
            for _, batch in snap:
                view.apply_batch(batch)
            assert view.held("CPU") == {k for c in chains for k in c}
            assert all(view.parents[c[i]] == c[i - 1] for c in chains for i in range(1, 4))
            # one BlockStored per chain (depth-first order), after AllBlocksCleared
            kinds = [type(e).__name__ for _, b in snap for e in b.events]
            assert kinds == ["AllBlocksCleared"] + ["BlockStored"] * 3
            # vLLM's replay: every buffered batch from a sequence number, then END_SEQ
            first = snap[0][0]
            got = sub.replay(0)
            seqs = [s for s, _ in got]
            assert seqs == list(range(seqs[0], seqs[-1] + 1)) and seqs[-1] == first
            assert type(wire.decode_batch(got[0][1]).events[0]).__name__ == "AllBlocksCleared"
            assert sub.replay(first + 1) == []
            more = put_chain(ns, 9, 2)[0]
            follow(sub, view, lambda: set(more) <= view.held("CPU"))
            assert sub.gaps == 0


def test_bad_replay_requests_are_answered_and_the_daemon_keeps_serving(daemon_factory):
    pub, replay = endpoints()
    d = daemon_factory(*SMALL_DRAM, *event_args(pub, replay))
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(replay)
    try:
        for body in (b"x", b"123456789", b""):
            sock.send_multipart((b"", body))
            assert sock.poll(5000)
            assert sock.recv_multipart() == [b"", b"", wire.END_SEQ, b"bad request"]
        sock.send_multipart((b"", b"a", b"b"))        # wrong frame count
        assert sock.poll(5000)
        assert sock.recv_multipart()[-2:] == [wire.END_SEQ, b"bad request"]
    finally:
        sock.close()
        ctx.term()
    with KVClient(d.socket) as client, EventSubscriber(pub, replay) as sub:
        ns = client.namespace("m", LAYOUT)
        keys = put_chain(ns, 3, 2)[0]
        view = TierView()
        for _, b in sub.sync():
            view.apply_batch(b)
        assert view.held("CPU") == set(keys)


def test_stream_restricted_to_named_tenants(daemon_factory, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("token-alice-0123456789 alice\ntoken-bob-0123456789ab bob\n")
    tokens.chmod(0o600)
    pub, replay = endpoints()
    d = daemon_factory(*SMALL_DRAM, "--tokens-file", str(tokens),
                       *event_args(pub, replay, "--kv-events-tenants", "alice"))
    with KVClient(d.socket, token="token-alice-0123456789") as ca, \
            KVClient(d.socket, token="token-bob-0123456789ab") as cb, \
            EventSubscriber(pub, replay) as sub:
        view = TierView()
        for _, b in sub.sync():
            view.apply_batch(b)
        na = ca.namespace("m", LAYOUT, tenant="alice")
        nb = cb.namespace("m", LAYOUT, tenant="bob")
        kb = put_chain(nb, 5, 3)[0]
        ka = put_chain(na, 5, 3)[0]
        follow(sub, view, lambda: view.held("CPU") == set(ka))
        nb.delete(kb)
        kb2 = put_chain(nb, 6, 3)[0]
        ka2 = put_chain(na, 6, 1)[0]
        follow(sub, view, lambda: view.held("CPU") == set(ka) | set(ka2))
        snap = TierView()
        for b in sub.snapshot()[1]:
            snap.apply_batch(b)
        assert snap.held("CPU") == set(ka) | set(ka2)
        assert not (set(kb) | set(kb2)) & (view.held("CPU") | snap.held("CPU"))
        # counted per tier change: AllBlocksCleared and alice's 4 blocks; bob's never left
        with KVClient(d.socket) as operator:       # a tenant sees only its own counters
            assert operator.stats().kv_events_published == 1 + 4


def test_stalled_subscriber_blocks_nothing_and_drops_are_counted(daemon_factory):
    pub, replay = endpoints()
    metrics_port = free_port()
    # A queue of 4 tier changes: a 1024-block delete (one change per block, recorded in one
    # event-loop step) overflows it, so the daemon must drop and count.
    # 16 MiB of 4 KiB slots: room for all 3584 blocks below, so nothing is evicted
    d = daemon_factory("--dram-bytes", "16MiB", "--chunk-bytes", "1MiB",
                       "--metrics-port", str(metrics_port),
                       *event_args(pub, replay, "--kv-events-queue", "4"))
    ctx = zmq.Context()
    stalled = ctx.socket(zmq.SUB)                   # connected, subscribed, never reads
    stalled.setsockopt(zmq.RCVHWM, 1)
    stalled.setsockopt(zmq.SUBSCRIBE, b"")
    stalled.connect(pub)
    small = LAYOUT.__class__(num_layers=1, num_kv_heads=1, head_dim=8, block_tokens=16,
                             dtype="uint8")
    try:
        with KVClient(d.socket) as client, EventSubscriber(pub, replay) as sub:
            view = TierView()
            for _, b in sub.sync():
                view.apply_batch(b)
            ns = client.namespace("small", small)
            rng = np.random.default_rng(0)
            t0 = time.monotonic()
            kept: list[bytes] = []
            for i in range(20):                      # puts and gets go on while it stalls
                tokens = rng.integers(0, 50000, 128 * 16)
                keys = ns.block_keys(tokens)
                data = rng.integers(0, 256, (128, *small.block_shape), dtype=np.uint8)
                ns.put(keys, data).result(timeout=30)
                out = np.empty_like(data)
                got = ns.get(keys, out=out).result(timeout=30)
                assert len(got) == 128 and np.array_equal(out, data)
                kept += keys
            assert time.monotonic() - t0 < 60
            tokens = rng.integers(0, 50000, 1024 * 16)
            keys = ns.block_keys(tokens)
            ns.put(keys, np.zeros((1024, *small.block_shape), dtype=np.uint8)).result(timeout=30)
            assert ns.delete(keys) == 1024
            st = client.stats()
            assert st.kv_events_dropped > 0
            body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                          timeout=10).read().decode()
            line = [ln for ln in body.splitlines() if ln.startswith("kvstore_kv_events_dropped")]
            assert line and float(line[0].split()[-1]) == st.kv_events_dropped
            # never silent: the healthy subscriber sees the gap, cannot replay it, and resyncs
            # to exactly what the daemon holds
            want = truth(ns, kept)["CPU"]
            assert want == set(kept)
            follow(sub, view, lambda: sub.gaps >= 1 and sub.snapshots >= 2
                   and view.held("CPU") == want)
    finally:
        stalled.close(linger=0)
        ctx.term()


def test_the_subscriber_example_of_the_docs_runs(daemon_factory, tmp_path):
    """docs/routing.md's first example, on free ports and for 2 polls instead of 10."""
    import re
    import subprocess
    import sys

    from kvstore.core.layout import KVLayout
    from support import REPO

    pub, replay = endpoints()
    d = daemon_factory("--dram-bytes", "64MiB", "--chunk-bytes", "8MiB", *event_args(pub, replay))
    text = (REPO / "docs" / "routing.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    code = (code.replace("tcp://127.0.0.1:5557", pub).replace("tcp://127.0.0.1:5558", replay)
            .replace("range(10)", "range(2)"))
    layout = KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, block_tokens=16)
    with KVClient(d.socket) as client:
        ns = client.namespace("meta-llama/Llama-3.1-8B", layout)
        keys = ns.block_keys(list(range(48)))                  # 3 of the example's 4 blocks
        ns.put(keys, np.zeros(3 * layout.block_bytes, dtype=np.uint8)).result(timeout=60)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["{'CPU': 3} 3", "{'CPU': 3} 3"]


def test_an_endpoint_in_use_stops_the_start_with_a_clear_error(daemon_factory):
    pub, replay = endpoints()
    daemon_factory(*SMALL_DRAM, *event_args(pub, replay))
    with pytest.raises(RuntimeError, match=r"kv_events: cannot bind tcp://127\.0\.0\.1:\d+"):
        daemon_factory(*SMALL_DRAM, *event_args(pub))


def test_hbm_copies_are_published_as_gpu(daemon_factory):
    """--hbm-device host: the HBM tier's protocol on shared memory. A get fills HBM copies
    (BlockStored GPU); a delete drops every tier's copy; a snapshot includes HBM copies."""
    import torch
    pub, replay = endpoints()
    d = daemon_factory("--dram-bytes", "4MiB", "--chunk-bytes", "256KiB",
                       "--hbm-bytes", "1MiB", "--hbm-device", "host", *event_args(pub, replay))
    with KVClient(d.socket) as client, EventSubscriber(pub, replay) as sub:
        view = TierView()
        for _, b in sub.sync():
            view.apply_batch(b)
        ns = client.namespace("m", LAYOUT)
        keys, data = put_chain(ns, 4, 6)
        out = torch.empty((6, *LAYOUT.block_shape), dtype=torch.uint8)
        got = ns.get(keys, out=out).result(timeout=30)            # the client fills HBM
        assert torch.equal(got, torch.from_numpy(data))
        follow(sub, view, lambda: view.held("GPU") == set(keys) == view.held("CPU"))
        assert ns.lookup(keys).tiers == ["HBM"] * 6
        snap = TierView()
        for b in sub.snapshot()[1]:
            snap.apply_batch(b)
        assert snap.held("GPU") == snap.held("CPU") == set(keys)
        assert ns.delete(keys[3:]) == 3
        follow(sub, view, lambda: view.held("GPU") == set(keys[:3]) == view.held("CPU"))
