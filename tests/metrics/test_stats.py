"""One metrics model, three views: `kvstore stats`, WatchStats and Prometheus /metrics agree."""
from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from support.net import free_port
from kvstore.client import KVClient
from kvstore.core.layout import KVLayout
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc

LAYOUT = KVLayout(2, 2, 64, block_tokens=16, dtype="float16")   # 16 KiB blocks


@pytest.fixture
def busy_daemon(daemon_factory):
    """A daemon with a metrics port, 8 blocks stored, 8 hits and 4 misses, 3 fallbacks."""
    port = free_port()
    d = daemon_factory("--dram-bytes", "64MiB", "--chunk-bytes", "4MiB",
                       "--metrics-port", str(port))
    d.metrics_port = port
    with KVClient(d.socket) as c:
        ns = c.namespace("stats-model", LAYOUT, tenant="t1")
        keys = ns.block_keys(np.arange(16 * 12))
        kv = np.zeros((8, *LAYOUT.block_shape), dtype=np.float16)
        assert ns.put(keys[:8], kv).result() == 8
        assert ns.get(keys).result().shape[0] == 8          # 8 hits, 4 misses
        c.report_fallbacks(3, blocks=4, reason="test")
        d.namespace_id = ns.namespace_id
    return d


def _cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvstore", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_stats_json_has_every_metric(busy_daemon):
    r = _cli("stats", "--socket", busy_daemon.socket, "--json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    (dram,) = st["tiers"]
    assert dram["tier"] == "DRAM"
    assert dram["capacity_bytes"] == 64 << 20
    assert dram["blocks"] == 8 and dram["used_bytes"] >= 8 * LAYOUT.block_bytes
    assert (dram["hits"], dram["misses"]) == (8, 4)
    assert dram["hit_rate"] == pytest.approx(8 / 12)
    assert dram["bytes_in"] == dram["bytes_out"] == 8 * LAYOUT.block_bytes
    for op in ("get_latency", "put_latency"):
        lat = dram[op]
        assert lat["count"] == 1 and 0 < lat["p50_s"] <= lat["p99_s"] < 60
        assert "bucket_counts" not in lat and "bucket_upper_s" not in lat   # behind --buckets
    for k in ("evictions", "promotions", "demotions", "read_bps", "write_bps"):
        assert k in dram
    (ns,) = st["namespaces"]
    assert (ns["model_id"], ns["tenant"], ns["blocks"], ns["bytes"]) == (
        "stats-model", "t1", 8, 8 * LAYOUT.block_bytes)
    assert ns["namespace_id"] == busy_daemon.namespace_id.hex()
    assert (st["recompute_fallbacks"], st["recompute_fallback_blocks"]) == (3, 4)
    for k in ("prefetch_on_time", "prefetch_late", "prefetch_wasted", "checksum_failures"):
        assert st[k] == 0


def test_stats_table_and_watch(busy_daemon):
    r = _cli("stats", "--socket", busy_daemon.socket)
    assert r.returncode == 0, r.stderr
    assert "DRAM" in r.stdout and "66.7%" in r.stdout and "stats-model" in r.stdout
    assert "recompute fallbacks 3 (4 blocks)" in r.stdout
    # --watch streams (WatchStats): read three NDJSON snapshots, then stop the viewer.
    p = subprocess.Popen([sys.executable, "-m", "kvstore", "stats", "--socket",
                          busy_daemon.socket, "--json", "--watch", "0.1"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        docs = [json.loads(p.stdout.readline()) for _ in range(3)]
    finally:
        p.terminate()
        p.wait(10)
    uptimes = [doc["uptime_s"] for doc in docs]
    assert uptimes == sorted(uptimes) and uptimes[-1] > uptimes[0]
    assert all(doc["tiers"][0]["hits"] == 8 for doc in docs)
    r = _cli("stats", "--socket", busy_daemon.socket, "--watch", "0")
    assert r.returncode == 2 and "--watch" in r.stderr


def test_watch_stats_stream_and_bad_interval(busy_daemon):
    with grpc.insecure_channel(f"unix:{busy_daemon.socket}") as ch:
        stub = pb_grpc.KVStoreStub(ch)
        stream = stub.WatchStats(pb.WatchStatsRequest(interval_s=0.05), timeout=10)
        snaps = [next(stream) for _ in range(3)]
        stream.cancel()
        assert [s.tiers[0].hits for s in snaps] == [8, 8, 8]
        assert snaps[0].recompute_fallbacks == 3
        with pytest.raises(grpc.RpcError) as exc:
            next(stub.WatchStats(pb.WatchStatsRequest(interval_s=0.001), timeout=5))
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "interval_s" in exc.value.details()


def test_prometheus_endpoint_matches_the_model(busy_daemon):
    base = f"http://127.0.0.1:{busy_daemon.metrics_port}"
    text = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
    samples = {}
    for fam in text_string_to_metric_families(text):
        assert fam.name.startswith("kvstore_"), fam.name
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    dram = (("tier", "DRAM"),)
    assert samples[("kvstore_tier_hits_total", dram)] == 8
    assert samples[("kvstore_tier_misses_total", dram)] == 4
    assert samples[("kvstore_tier_capacity_bytes", dram)] == 64 << 20
    assert samples[("kvstore_tier_blocks", dram)] == 8
    assert samples[("kvstore_tier_hit_ratio", dram)] == pytest.approx(8 / 12)
    assert samples[("kvstore_get_latency_seconds_count", dram)] == 1
    assert samples[("kvstore_put_latency_seconds_bucket", (("le", "+Inf"), ("tier", "DRAM")))] == 1
    assert samples[("kvstore_recompute_fallbacks_total", ())] == 3
    assert samples[("kvstore_prefetch_total", (("outcome", "late"),))] == 0
    ns_labels = (("model", "stats-model"), ("namespace", busy_daemon.namespace_id.hex()),
                 ("tenant", "t1"))
    assert samples[("kvstore_namespace_blocks", ns_labels)] == 8
    # The page and the JSON API are on the same port; the port is read-only.
    page = urllib.request.urlopen(base + "/", timeout=10).read().decode()
    assert "getContext(\"2d\")" in page and "/api/stats" in page
    api = json.loads(urllib.request.urlopen(base + "/api/stats", timeout=10).read())
    assert api["tiers"][0]["hits"] == 8
    req = urllib.request.Request(base + "/metrics", method="POST", data=b"x")
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(req, timeout=10)
    assert exc.value.code == 405
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(base + "/nope", timeout=10)
    assert exc.value.code == 404


def test_sdk_stats_is_a_readable_object(busy_daemon):
    from kvstore.client.stats import Stats, Tier
    with KVClient(busy_daemon.socket) as c:
        st = c.stats()
        watched = next(c.watch_stats(0.05))
    assert isinstance(st, Stats) and isinstance(watched, Stats)
    dram = st.tier("DRAM")
    assert dram is st.tier(Tier.DRAM) and st.tier("ssd") is None
    assert (dram.hits, dram.misses, dram.blocks) == (8, 4, 8)
    assert dram.hit_rate == pytest.approx(8 / 12)
    assert dram.tier == pb.TIER_DRAM and str(dram.tier) == "DRAM"   # equal to the proto's enum
    assert dram.get_latency.count == 1 and dram.get_latency.bucket_counts[-1] == 1
    (ns,) = st.namespaces
    assert (ns.model_id, ns.tenant, ns.blocks, ns.namespace_id) == (
        "stats-model", "t1", 8, busy_daemon.namespace_id)
    assert (st.recompute_fallbacks, st.recompute_fallback_blocks) == (3, 4)
    assert isinstance(st.proto, pb.Stats) and st.proto.tiers[0].hits == 8   # the raw message
    text = str(st)
    lines = text.splitlines()
    assert len(lines) <= 8, text                 # a short table, not ~130 lines of proto text
    assert lines[0].startswith("kvstore ") and "sessions" in lines[0]
    assert "hit rate" in lines[1]
    assert "DRAM" in lines[2] and "66.7%" in lines[2] and " 8 " in lines[2]
    assert "recompute fallbacks 3" in text and "{" not in text


def test_sdk_stats_objects_cover_every_proto_field():
    """A field added to the Stats messages must reach the SDK object, not only .proto."""
    from dataclasses import fields
    from kvstore.client import stats
    for cls, msg in [(stats.Stats, pb.Stats), (stats.TierStats, pb.TierStats),
                     (stats.NamespaceStats, pb.NamespaceStats),
                     (stats.Latency, pb.LatencySummary)]:
        missing = {f.name for f in msg.DESCRIPTOR.fields} - {f.name for f in fields(cls)}
        assert not missing, (cls.__name__, missing)


def test_stats_json_buckets_behind_a_flag(busy_daemon):
    r = _cli("stats", "--socket", busy_daemon.socket, "--json", "--buckets")
    assert r.returncode == 0, r.stderr
    lat = json.loads(r.stdout)["tiers"][0]["get_latency"]
    assert lat["bucket_counts"][-1] == 1 and len(lat["bucket_upper_s"]) == len(
        lat["bucket_counts"]) > 10
    default = _cli("stats", "--socket", busy_daemon.socket, "--json").stdout
    assert len(default.splitlines()) < len(r.stdout.splitlines()) / 2
