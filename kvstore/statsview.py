"""Views of the daemon's Stats message: a readable table and a JSON-ready dict."""
from __future__ import annotations

from google.protobuf.json_format import MessageToDict

from kvstore.units import format_bytes
from kvstore.v1 import kvstore_pb2 as pb


def stats_to_dict(st: pb.Stats) -> dict:
    d = MessageToDict(st, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    for t in d.get("tiers", []):
        t["tier"] = t["tier"].removeprefix("TIER_")
        for k, v in list(t.items()):
            if k != "tier":
                t[k] = int(v)
        lookups = t["hits"] + t["misses"]
        t["hit_rate"] = t["hits"] / lookups if lookups else 0.0
    for ns in d.get("namespaces", []):
        ns["namespace_id"] = st.namespaces[d["namespaces"].index(ns)].namespace_id.hex()
        ns["blocks"] = int(ns["blocks"])
        ns["bytes"] = int(ns["bytes"])
    return d


def render_table(st: pb.Stats) -> str:
    cols = ["tier", "capacity", "used", "blocks", "hits", "misses", "hit rate", "evictions",
            "bytes in", "bytes out"]
    rows = []
    for t in st.tiers:
        total = t.hits + t.misses
        rows.append([
            pb.Tier.Name(t.tier).removeprefix("TIER_"), format_bytes(t.capacity_bytes),
            format_bytes(t.used_bytes), str(t.blocks), str(t.hits), str(t.misses),
            f"{100 * t.hits / total:.1f}%" if total else "-", str(t.evictions),
            format_bytes(t.bytes_in), format_bytes(t.bytes_out),
        ])
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    lines = [f"kvstore {st.daemon_version}  up {st.uptime_s:.0f}s  sessions {st.sessions}  "
             f"active leases {st.active_leases}  lookups {st.lookups}"]
    lines.append("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for r in rows:
        lines.append("  ".join(v.rjust(w) for v, w in zip(r, widths)))
    for t in st.tiers:
        if t.tier == pb.TIER_SSD:
            lines.append(f"SSD: read {format_bytes(int(t.read_bps))}/s  write "
                         f"{format_bytes(int(t.write_bps))}/s  promotions {t.promotions}  "
                         f"demotions {t.demotions}  checksum failures {t.checksum_failures}  "
                         f"I/O errors {t.io_errors}  recovered {t.recovered_blocks}")
    if st.namespaces:
        lines.append("")
        lines.append("namespaces:")
        for ns in st.namespaces:
            lines.append(f"  {ns.namespace_id.hex()[:12]}  {ns.model_id!r:<24} tenant "
                         f"{ns.tenant or '-':<10} {ns.blocks:>8} blocks  {format_bytes(ns.bytes)}")
    return "\n".join(lines)
