"""The daemon's statistics as plain Python objects: what `KVClient.stats()` returns.

    st = client.stats()
    print(st)                        # a short table: one row per tier, then the counters
    st.tier("DRAM").hit_rate         # TierStats of one tier (None when the daemon has no such tier)
    st.prefetch_on_time, st.checksum_failures, st.namespaces[0].blocks
    st.proto                         # the kvstore.v1.Stats message as received

Every field of the Stats, TierStats, NamespaceStats and LatencySummary messages has an attribute
of the same name here (tests/metrics/test_stats.py checks it), so code written against the message reads
the same; `tier` is a ``Tier`` (an IntEnum equal to the proto's ``TIER_*`` numbers) that prints as
its name. The objects are frozen snapshots: they do not change when the daemon's figures do.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields

from kvstore.core.units import format_bytes
from kvstore.v1 import kvstore_pb2 as pb


class Tier(enum.IntEnum):
    """A storage tier; equal to the proto's TIER_* values (Tier.DRAM == pb.TIER_DRAM)."""
    UNSPECIFIED = pb.TIER_UNSPECIFIED
    HBM = pb.TIER_HBM
    DRAM = pb.TIER_DRAM
    SSD = pb.TIER_SSD
    REMOTE = pb.TIER_REMOTE

    def __str__(self) -> str:
        return self.name


def _scalars(cls, msg) -> dict:
    """The message's values of cls's fields, except those the caller builds itself."""
    return {f.name: getattr(msg, f.name) for f in fields(cls)
            if f.metadata.get("from_proto", True)}


_BUILT = {"from_proto": False}   # metadata: a field from_proto converts rather than copies


@dataclass(frozen=True)
class Latency:
    """A latency histogram as the daemon summarises it (quantiles within one bucket, ~20%)."""
    count: int = 0
    sum_s: float = 0.0
    p50_s: float = 0.0
    p99_s: float = 0.0
    bucket_upper_s: tuple[float, ...] = field(default=(), repr=False, metadata=_BUILT)
    bucket_counts: tuple[int, ...] = field(default=(), repr=False, metadata=_BUILT)

    @classmethod
    def from_proto(cls, msg: pb.LatencySummary) -> "Latency":
        return cls(**_scalars(cls, msg), bucket_upper_s=tuple(msg.bucket_upper_s),
                   bucket_counts=tuple(msg.bucket_counts))


@dataclass(frozen=True)
class RemoteNodeStats:
    """One node of the cluster tier's engine (Redis Cluster): a dead node costs its keys only."""
    node: str = ""                    # HOST:PORT
    circuit_state: str = ""           # closed, open (not called) or half_open (probing)
    errors: int = 0                   # calls to this node that failed
    keys_unavailable: int = 0         # keys not read or written: the node failed or was skipped

    @classmethod
    def from_proto(cls, msg: pb.RemoteNode) -> "RemoteNodeStats":
        return cls(**_scalars(cls, msg))


@dataclass(frozen=True)
class TierStats:
    """One tier's occupancy, traffic and latency."""
    tier: Tier = field(metadata=_BUILT)
    capacity_bytes: int = 0
    ready_bytes: int = 0              # DRAM: the part of the arena prepared so far (start-up)
    used_bytes: int = 0
    blocks: int = 0
    hits: int = 0
    misses: int = 0
    hit_rate: float = 0.0             # hits / (hits + misses); 0 when there were none
    evictions: int = 0
    promotions: int = 0
    demotions: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    read_bps: float = 0.0             # recent bandwidth, bytes per second
    write_bps: float = 0.0
    checksum_failures: int = 0        # SSD: blocks that failed verification (served as misses)
    io_errors: int = 0
    recovered_blocks: int = 0         # SSD: blocks rebuilt at start-up
    queue_depth: int = 0              # REMOTE: blocks waiting for the background writer
    circuit_state: str = ""           # REMOTE: closed, open or half_open
    writes_skipped: int = 0           # REMOTE: blocks not written (queue full, remote down)
    writes_deduplicated: int = 0      # REMOTE: blocks another host had stored already
    timeouts: int = 0                 # REMOTE: calls that missed their deadline
    backend: str = ""                 # REMOTE: mooncake://... or redis://...
    get_latency: Latency = field(default_factory=Latency, metadata=_BUILT)
    put_latency: Latency = field(default_factory=Latency, metadata=_BUILT)
    remote_nodes: tuple[RemoteNodeStats, ...] = field(default=(), metadata=_BUILT)  # REMOTE

    @classmethod
    def from_proto(cls, msg: pb.TierStats) -> "TierStats":
        return cls(**_scalars(cls, msg), tier=Tier(msg.tier),
                   get_latency=Latency.from_proto(msg.get_latency),
                   put_latency=Latency.from_proto(msg.put_latency),
                   remote_nodes=tuple(RemoteNodeStats.from_proto(n) for n in msg.remote_nodes))


@dataclass(frozen=True)
class NamespaceStats:
    """Blocks and bytes one namespace (model id, layout, tenant) holds in all tiers."""
    namespace_id: bytes
    model_id: str = ""
    tenant: str = ""
    blocks: int = 0
    bytes: int = 0

    @classmethod
    def from_proto(cls, msg: pb.NamespaceStats) -> "NamespaceStats":
        return cls(**_scalars(cls, msg))


@dataclass(frozen=True)
class Stats:
    """A snapshot of the daemon's statistics (GetStats / WatchStats)."""
    daemon_version: str = ""
    uptime_s: float = 0.0
    sessions: int = 0
    active_leases: int = 0
    lookups: int = 0
    reads_reported: int = 0           # DRAM blocks read lease-free by same-host clients
    tiers: tuple[TierStats, ...] = field(default=(), metadata=_BUILT)
    namespaces: tuple[NamespaceStats, ...] = field(default=(), metadata=_BUILT)
    puts_rejected: int = 0            # RESOURCE_EXHAUSTED answers to puts
    leases_expired: int = 0
    sessions_reclaimed: int = 0
    checksum_failures: int = 0        # blocks served as misses because their checksum failed
    recompute_fallbacks: int = 0      # reported by clients (ReportFallbacks)
    recompute_fallback_blocks: int = 0
    requests_throttled: int = 0       # RESOURCE_EXHAUSTED for clients over their limits
    auth_failures: int = 0
    prefetch_issued: int = 0
    prefetch_pending: int = 0
    prefetch_on_time: int = 0
    prefetch_late: int = 0
    prefetch_wasted: int = 0
    prefetch_cancelled: int = 0
    prefetch_bytes_promoted: int = 0
    quarantined_bytes: int = 0        # slots held back from reuse: a writer may still copy in
    lookup_latency: Latency = field(default_factory=Latency, metadata=_BUILT)  # gRPC Lookup calls
    kv_events_published: int = 0      # KV events sent to routers (block tier changes)
    kv_events_dropped: int = 0        # KV events dropped: the publisher fell behind (a gap)
    proto: pb.Stats = field(default_factory=pb.Stats, repr=False, compare=False,
                            metadata=_BUILT)

    @classmethod
    def from_proto(cls, msg: pb.Stats) -> "Stats":
        return cls(**_scalars(cls, msg),
                   tiers=tuple(TierStats.from_proto(t) for t in msg.tiers),
                   namespaces=tuple(NamespaceStats.from_proto(n) for n in msg.namespaces),
                   lookup_latency=Latency.from_proto(msg.lookup_latency), proto=msg)

    def tier(self, name: str | Tier) -> TierStats | None:
        """The named tier's row ("DRAM", "ssd", Tier.HBM), or None when the daemon has none;
        KeyError for a name that is no tier."""
        want = name if isinstance(name, Tier) else Tier[str(name).upper()]
        return next((t for t in self.tiers if t.tier == want), None)

    def __str__(self) -> str:
        """A short table (the full one, with bandwidth and latency, is `kvstore stats`)."""
        cols = ("tier", "capacity", "used", "blocks", "hits", "misses", "hit rate", "evictions")
        rows = [(str(t.tier), format_bytes(t.capacity_bytes), format_bytes(t.used_bytes),
                 str(t.blocks), str(t.hits), str(t.misses),
                 f"{100 * t.hit_rate:.1f}%" if t.hits + t.misses else "-", str(t.evictions))
                for t in self.tiers]
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
        lines = [f"kvstore {self.daemon_version}  up {self.uptime_s:.0f}s  sessions "
                 f"{self.sessions}  leases {self.active_leases}  namespaces "
                 f"{len(self.namespaces)}  lookups {self.lookups}"]
        lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in [cols, *rows]]
        lines.append(f"prefetch {self.prefetch_issued} issued, {self.prefetch_on_time} on time, "
                     f"{self.prefetch_late} late; recompute fallbacks {self.recompute_fallbacks}; "
                     f"checksum failures {self.checksum_failures}; puts rejected "
                     f"{self.puts_rejected}")
        return "\n".join(lines)
