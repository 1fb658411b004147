"""The Prometheus view of the Stats model: every metric is named kvstore_*.

Built per scrape from one Stats snapshot through prometheus_client's collector interface, so the
exposition format (escaping, _total suffixes, histogram buckets) is the library's, not ours.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily)

from kvstore.v1 import kvstore_pb2 as pb

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TIER_GAUGES = [
    ("capacity_bytes", "capacity_bytes", "Tier capacity in bytes"),
    ("ready_bytes", "ready_bytes", "Capacity usable now (DRAM: below capacity while the arena "
     "is still prepared after start-up; SSD: 0 while its index loads after a restart)"),
    ("used_bytes", "used_bytes", "Bytes of the tier in use"),
    ("blocks", "blocks", "Blocks stored in the tier"),
    ("hit_ratio", "hit_rate", "hits / (hits + misses) since start"),
    ("read_bytes_per_second", "read_bps", "Recent read bandwidth (bytes out per second)"),
    ("write_bytes_per_second", "write_bps", "Recent write bandwidth (bytes in per second)"),
]
_TIER_COUNTERS = [
    ("hits", "hits", "Block lookups answered from the tier"),
    ("misses", "misses", "Blocks asked for and not found in the tier"),
    ("evictions", "evictions", "Blocks evicted from the tier"),
    ("promotions", "promotions", "Blocks promoted into the tier"),
    ("demotions", "demotions", "Blocks demoted out of the tier"),
    ("bytes_in", "bytes_in", "Bytes written into the tier"),
    ("bytes_out", "bytes_out", "Bytes read out of the tier"),
    ("io_errors", "io_errors", "Failed tier I/O (SSD reads/writes, remote calls): the block "
     "is dropped from the tier or missed, never served"),
    ("checksum_failures", "checksum_failures", "Blocks of the tier that failed their checksum "
     "(served as misses)"),
]
_DAEMON_COUNTERS = [
    ("lookups", "Lookup calls"),
    ("reads_reported", "DRAM blocks same-host clients read without a lease (ReportReads)"),
    ("puts_rejected", "Puts refused because the tier was full of leased blocks"),
    ("leases_expired", "Leases that expired before release"),
    ("sessions_reclaimed", "Sessions whose client died with leases or allocations open"),
    ("checksum_failures", "Blocks that failed their checksum (served as misses)"),
    ("recompute_fallbacks", "Requests clients recomputed instead of loading (reported)"),
    ("recompute_fallback_blocks", "Blocks clients recomputed instead of loading (reported)"),
    ("requests_throttled", "Calls refused with RESOURCE_EXHAUSTED for a client over its limits"),
    ("auth_failures", "Calls refused for a missing or invalid token"),
    ("kv_events_published", "KV events published to routers (block tier changes)"),
    ("kv_events_dropped", "KV events dropped because the publisher fell behind (a sequence gap)"),
]


class _StatsCollector:
    def __init__(self, st: pb.Stats):
        self.st = st

    def collect(self):
        st = self.st
        tiers = [(pb.Tier.Name(t.tier).removeprefix("TIER_"), t) for t in st.tiers]
        for name, attr, doc in _TIER_GAUGES:
            g = GaugeMetricFamily(f"kvstore_tier_{name}", doc, labels=["tier"])
            for label, t in tiers:
                g.add_metric([label], float(getattr(t, attr)))
            yield g
        for name, attr, doc in _TIER_COUNTERS:
            c = CounterMetricFamily(f"kvstore_tier_{name}", doc, labels=["tier"])
            for label, t in tiers:
                c.add_metric([label], float(getattr(t, attr)))
            yield c
        for op in ("get", "put"):
            h = HistogramMetricFamily(f"kvstore_{op}_latency_seconds",
                                      f"{op} latency as the daemon sees it "
                                      f"({'acquire to release' if op == 'get' else 'allocate to commit'})",
                                      labels=["tier"])
            for label, t in tiers:
                h.add_metric([label], *_buckets(getattr(t, f"{op}_latency")))
            yield h
        h = HistogramMetricFamily("kvstore_lookup_latency_seconds", "Lookup calls over gRPC, "
                                  "as the daemon sees them (same-host clients that read the "
                                  "shared-memory index make no call)")
        h.add_metric([], *_buckets(st.lookup_latency))
        yield h
        for suffix, attr, doc in (("blocks", "blocks", "Blocks stored per namespace"),
                                  ("bytes", "bytes", "Bytes stored per namespace")):
            g = GaugeMetricFamily(f"kvstore_namespace_{suffix}", doc,
                                  labels=["namespace", "model", "tenant"])
            for ns in st.namespaces:
                g.add_metric([ns.namespace_id.hex(), ns.model_id, ns.tenant],
                             float(getattr(ns, attr)))
            yield g
        p = CounterMetricFamily("kvstore_prefetch", "Prefetches by outcome", labels=["outcome"])
        for outcome in ("on_time", "late", "wasted"):
            p.add_metric([outcome], float(getattr(st, f"prefetch_{outcome}")))
        yield p
        yield from _remote_metrics(st)
        for attr, doc in _DAEMON_COUNTERS:
            yield CounterMetricFamily(f"kvstore_{attr}", doc, value=float(getattr(st, attr)))
        yield GaugeMetricFamily("kvstore_sessions", "Open client sessions", value=st.sessions)
        yield GaugeMetricFamily("kvstore_active_leases", "Leases held now",
                                value=st.active_leases)
        yield GaugeMetricFamily("kvstore_quarantined_bytes",
                                "Slots held back from reuse while a writer may still copy into them",
                                value=st.quarantined_bytes)
        yield GaugeMetricFamily("kvstore_uptime_seconds", "Seconds since the daemon started",
                                value=st.uptime_s)
        info = GaugeMetricFamily("kvstore_build_info", "Daemon version", labels=["version"])
        info.add_metric([st.daemon_version], 1.0)
        yield info


_REMOTE_COUNTERS = [
    ("checksum_failures", "Remote values that were not the block asked for: removed, a miss"),
    ("io_errors", "Remote calls that failed, and puts the engine refused"),
    ("timeouts", "Remote calls that missed their deadline"),
    ("writes_skipped", "Blocks not written to the remote: queue full or remote unavailable"),
    ("writes_deduplicated", "Blocks another host had stored already: not sent again"),
]


def _remote_metrics(st: pb.Stats):
    """The cluster tier's own figures (its hits, bytes, bandwidth are in kvstore_tier_*)."""
    rows = [t for t in st.tiers if t.tier == pb.TIER_REMOTE]
    if not rows:
        return
    (t,) = rows
    for attr, doc in _REMOTE_COUNTERS:
        yield CounterMetricFamily(f"kvstore_remote_{attr}", doc, value=float(getattr(t, attr)))
    yield GaugeMetricFamily("kvstore_remote_queue_depth", "Blocks waiting for the remote writer",
                            value=t.queue_depth)
    g = GaugeMetricFamily("kvstore_remote_circuit", "1 for the circuit breaker's state "
                          "(open: the remote is not called)", labels=["state"])
    for state in ("closed", "open", "half_open"):
        g.add_metric([state], float(t.circuit_state == state))
    yield g


def _buckets(s: pb.LatencySummary) -> tuple[list[tuple[str, float]], float]:
    """(buckets, sum) of a LatencySummary, as HistogramMetricFamily.add_metric takes them."""
    buckets = [(_le(u), float(c)) for u, c in zip(s.bucket_upper_s, s.bucket_counts)]
    return buckets or [("+Inf", 0.0)], s.sum_s


def _le(upper: float) -> str:
    return "+Inf" if upper == float("inf") else repr(upper)


def prometheus_text(st: pb.Stats) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StatsCollector(st))
    return generate_latest(registry)
