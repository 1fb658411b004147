"""Views of the daemon's Stats message: a readable table and a JSON-ready dict."""
from __future__ import annotations

from google.protobuf.json_format import MessageToDict

from kvstore.core.units import format_bytes
from kvstore.v1 import kvstore_pb2 as pb


def _ints(d):
    """MessageToDict writes 64-bit integers as strings (JSON's doubles lose precision); we
    want numbers: counts here stay far below 2**53."""
    if isinstance(d, dict):
        return {k: _ints(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_ints(v) for v in d]
    if isinstance(d, str) and d.isdigit():
        return int(d)
    return d


def stats_to_dict(st: pb.Stats, *, buckets: bool = False) -> dict:
    """Every field of st as JSON-ready values. The latency histograms' buckets (two lists of
    ~90 numbers per tier and operation) only with buckets=True: count, sum and the quantiles
    are in the default view, and /metrics has the histograms for Prometheus."""
    d = _ints(MessageToDict(st, preserving_proto_field_name=True,
                            always_print_fields_with_no_presence=True))
    for t in d.get("tiers", []):
        t["tier"] = t["tier"].removeprefix("TIER_")
        if not buckets:
            for op in ("get_latency", "put_latency"):
                for k in ("bucket_upper_s", "bucket_counts"):
                    t.get(op, {}).pop(k, None)
    if not buckets:
        for k in ("bucket_upper_s", "bucket_counts"):
            d.get("lookup_latency", {}).pop(k, None)
    for ns, msg in zip(d.get("namespaces", []), st.namespaces):
        ns["namespace_id"] = msg.namespace_id.hex()
    return d


def _rate(bps: float) -> str:
    return f"{format_bytes(int(bps))}/s"


def _ms(s: float) -> str:
    return f"{s * 1e3:.2f}" if s else "-"


def _readiness(t) -> str:
    """What a capacity column adds while a tier is not fully usable: DRAM's arena still being
    prepared, or an SSD tier whose index is still loading after a restart (nothing ready)."""
    if t.ready_bytes >= t.capacity_bytes:
        return ""
    if t.tier == pb.TIER_SSD:
        return f" (loading index: {t.recovered_blocks} blocks so far)"
    return f" ({format_bytes(t.ready_bytes)} ready)"


def render_table(st: pb.Stats) -> str:
    cols = ["tier", "capacity", "used", "blocks", "hits", "misses", "hit rate", "evictions",
            "promo", "demo", "bytes in", "bytes out", "read", "write",
            "get p50/p99 ms", "put p50/p99 ms"]
    rows = []
    for t in st.tiers:
        total = t.hits + t.misses
        rows.append([
            pb.Tier.Name(t.tier).removeprefix("TIER_"),
            format_bytes(t.capacity_bytes) + _readiness(t),
            format_bytes(t.used_bytes), str(t.blocks), str(t.hits), str(t.misses),
            f"{100 * t.hits / total:.1f}%" if total else "-", str(t.evictions),
            str(t.promotions), str(t.demotions),
            format_bytes(t.bytes_in), format_bytes(t.bytes_out),
            _rate(t.read_bps), _rate(t.write_bps),
            f"{_ms(t.get_latency.p50_s)}/{_ms(t.get_latency.p99_s)}",
            f"{_ms(t.put_latency.p50_s)}/{_ms(t.put_latency.p99_s)}",
        ])
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    lines = [f"kvstore {st.daemon_version}  up {st.uptime_s:.0f}s  sessions {st.sessions}  "
             f"active leases {st.active_leases}  lookups {st.lookups}  "
             f"lease-free reads {st.reads_reported}  "
             f"quarantined {format_bytes(st.quarantined_bytes)}"]
    lines.append("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for r in rows:
        lines.append("  ".join(v.rjust(w) for v, w in zip(r, widths)))
    for t in st.tiers:
        if t.tier == pb.TIER_SSD:
            io = f" ({t.backend})" if t.backend else ""
            lines.append(f"SSD{io}: read {format_bytes(int(t.read_bps))}/s  write "
                         f"{format_bytes(int(t.write_bps))}/s  promotions {t.promotions}  "
                         f"demotions {t.demotions}  checksum failures {t.checksum_failures}  "
                         f"I/O errors {t.io_errors}  recovered {t.recovered_blocks}")
        if t.tier == pb.TIER_REMOTE:
            lines.append(f"REMOTE {t.backend}: circuit {t.circuit_state}  queue {t.queue_depth}  "
                         f"read {format_bytes(int(t.read_bps))}/s  write "
                         f"{format_bytes(int(t.write_bps))}/s  deduplicated "
                         f"{t.writes_deduplicated}  skipped {t.writes_skipped}  errors "
                         f"{t.io_errors}  timeouts {t.timeouts}  checksum failures "
                         f"{t.checksum_failures}")
    lines.append("")
    lines.append(f"prefetch issued {st.prefetch_issued}  pending {st.prefetch_pending}  on time "
                 f"{st.prefetch_on_time}  late {st.prefetch_late}  wasted {st.prefetch_wasted}  "
                 f"cancelled {st.prefetch_cancelled}  promoted "
                 f"{format_bytes(st.prefetch_bytes_promoted)}")
    lines.append(f"checksum failures {st.checksum_failures}   recompute fallbacks "
                 f"{st.recompute_fallbacks} ({st.recompute_fallback_blocks} blocks)   lookup "
                 f"p50/p99 ms {_ms(st.lookup_latency.p50_s)}/{_ms(st.lookup_latency.p99_s)}")
    lines.append(f"puts rejected {st.puts_rejected}  throttled {st.requests_throttled}  "
                 f"auth failures {st.auth_failures}  leases expired {st.leases_expired}  "
                 f"sessions reclaimed {st.sessions_reclaimed}")
    if st.namespaces:
        lines.append("")
        lines.append("namespaces:")
        for ns in st.namespaces:
            lines.append(f"  {ns.namespace_id.hex()[:12]}  {ns.model_id!r:<24} tenant "
                         f"{ns.tenant or '-':<10} {ns.blocks:>8} blocks  {format_bytes(ns.bytes)}")
    return "\n".join(lines)
