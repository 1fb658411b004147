"""kvstore bench trace — a production trace replayed against real daemons, against the ideal
caches of the same capacity computed in the same run.

Every request of the trace (default: Mooncake's one-hour Kimi conversation trace) is, on the
host a router picks: a lookup of its block chain, a get of the longest stored prefix (every
byte checked against the bytes derived from the block's key: any wrong byte fails the run), a
put of the rest. Blocks are 512 tokens (the trace's) of --block-bytes bytes; capacities are
given in tokens per host.

Reported: the fraction of the prompts' block references (512 tokens each) served from DRAM,
SSD and REMOTE, and recomputed; next to it, on the same requests, an infinite cache (the upper
bound), Belady's offline optimum and LRU, each one cache of the fleet's total capacity (DRAM +
SSD blocks of every host); and the replay speed (requests/s, and the multiple of the trace's
own arrival rate).

With --hosts N > 1, each routing runs on a fresh fleet of N daemons (--route both: round robin
and kv-aware; kv-aware routes on Dynamo's RadixTree fed by the daemons' KV events, with a load
bound), and one daemon holding the fleet's total capacity replays the same requests (the
shared cache): routing_gain = kv-aware / round robin, kv_vs_shared = kv-aware / shared.

Goals (4 hosts, no cluster tier): kv_vs_shared >= 0.9, routing_gain >= 2, load max/mean
<= 1.3; one host replays at >= 10x real time.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from kvstore.bench.trace.workload import DEFAULT_TRACE, TRACE_BLOCK_TOKENS

GOALS = {"kv_vs_shared": 0.9, "routing_gain": 2.0, "load_max_over_mean": 1.3,
         "replay_speed_x": 10.0}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kvstore bench trace", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:]), allow_abbrev=False)
    ap.add_argument("--trace", type=Path, default=DEFAULT_TRACE,
                    help=f"JSON-lines trace (default {DEFAULT_TRACE}, relative to the "
                         "working directory)")
    ap.add_argument("--limit", type=int, help="replay only the first N requests")
    ap.add_argument("--hosts", type=int, default=1, help="daemons (default 1)")
    ap.add_argument("--route", choices=["round-robin", "kv-aware", "both"],
                    help="routing with --hosts > 1 (default both)")
    ap.add_argument("--dram-tokens", type=int, default=3_000_000,
                    help="DRAM capacity per host in tokens (default 3,000,000: 5,859 blocks)")
    ap.add_argument("--ssd-tokens", type=int, default=0,
                    help="SSD capacity per host in tokens (default 0: no SSD tier); rounded up "
                         "to whole slab files")
    ap.add_argument("--block-bytes", type=int, default=4096,
                    help="bytes per 512-token block (a multiple of 1024; default 4096, the "
                         "tiers' slot size)")
    ap.add_argument("--remote", choices=["redis", "mooncake"],
                    help="add a cluster tier: a real Redis Cluster or Mooncake master every "
                         "host uses")
    ap.add_argument("--dir", type=Path,
                    help="where the hosts' directories (SSD slab files) go (default: the "
                         "temporary directory); must be a disk, not a tmpfs, for an SSD tier")
    ap.add_argument("--speed", type=float, default=0.0,
                    help="replay at this multiple of the trace's arrival times (default 0: as "
                         "fast as possible)")
    ap.add_argument("--inflight", type=int, default=4, help="puts in flight per host (default 4)")
    ap.add_argument("--load-bound", type=float, default=1.2,
                    help="kv-aware: a host above this multiple of the mean recent load is not "
                         "a candidate (default 1.2)")
    ap.add_argument("--load-window", type=int, default=64,
                    help="kv-aware: the recent load is the last N routed requests (default 64)")
    ap.add_argument("--no-shared", action="store_true",
                    help="with --hosts > 1, skip the shared-cache replay")
    ap.add_argument("--quiet", action="store_true", help="no progress on stderr")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.hosts < 1:
        print("kvstore bench trace: --hosts must be >= 1", file=sys.stderr)
        return 2
    if not args.trace.exists():
        print(f"kvstore bench trace: no trace at {args.trace} (--trace PATH; the Mooncake "
              "repository's FAST25-release/traces/conversation_trace.jsonl)", file=sys.stderr)
        return 2
    if args.hosts > 1 and args.route != "round-robin":
        try:
            import dynamo.llm  # noqa: F401
            import msgspec  # noqa: F401
            import zmq  # noqa: F401
        except ImportError as exc:
            print(f"kvstore bench trace: kv-aware routing needs the daemons' KV events and "
                  f"Dynamo's index ({exc}): pip install 'kvstore-offload[trace]', or --route "
                  "round-robin", file=sys.stderr)
            return 2
    if args.remote:
        from kvstore.bench.cluster_engines import skip_reason
        reason = skip_reason(args.remote)
        if reason:
            print(f"kvstore bench trace: --remote {args.remote}: {reason}", file=sys.stderr)
            return 2
    # Dynamo's index logs a warning line per block event it cannot apply (thousands in a run);
    # the replay counts those itself (index_rejected), so keep its console to errors.
    os.environ.setdefault("DYN_LOG", "error")
    # `timeout` and CI stop a long run with SIGTERM: unwind through the cleanup so no daemon
    # (nor its arena in /dev/shm) outlives the run.
    signal.signal(signal.SIGTERM, _terminated)
    result = run(args)
    emit = json.dumps(result, indent=2) if args.json else "\n".join(render(result))
    print(emit)
    if result["wrong_bytes"]:
        print(f"kvstore bench trace: {result['wrong_bytes']} wrong bytes served",
              file=sys.stderr)
        return 1
    return 0


def _terminated(signum, frame):
    raise SystemExit(128 + signum)


def _say(args, text: str) -> None:
    if not args.quiet:
        print(text, file=sys.stderr, flush=True)


def run(args) -> dict:
    """Replay and compute the ideal figures; the result dict the JSON output is."""
    from kvstore.bench.trace.hosts import HostSize
    from kvstore.bench.trace.ideal import belady_hits, infinite_hits, lru_hits
    from kvstore.bench.trace.workload import load_trace, trace_layout

    layout = trace_layout(args.block_bytes)
    t0 = time.perf_counter()
    trace = load_trace(args.trace, layout, args.limit)
    size = HostSize(args.dram_tokens // TRACE_BLOCK_TOKENS,
                    args.ssd_tokens // TRACE_BLOCK_TOKENS, layout)
    if size.dram_blocks < 2:
        raise SystemExit("kvstore bench trace: --dram-tokens must cover 2 blocks at least")
    per_host = size.dram_blocks + size.ssd_capacity_blocks
    capacity = args.hosts * per_host
    chains = trace.chains()
    refs = trace.block_refs
    _say(args, f"trace: {len(trace.requests)} requests, {refs} block references, "
               f"{trace.n_blocks} blocks ({time.perf_counter() - t0:.1f} s); ideal caches of "
               f"{capacity} blocks ...")
    ideal = {"infinite_hit_ratio": infinite_hits(chains) / refs,
             "belady_hit_ratio": belady_hits(chains, capacity, trace.n_blocks) / refs,
             "lru_hit_ratio": lru_hits(chains, capacity) / refs}
    result: dict = {
        "trace": str(args.trace), "requests": len(trace.requests), "block_refs": refs,
        "distinct_blocks": trace.n_blocks, "trace_duration_s": trace.duration_s,
        "hosts": args.hosts, "block_bytes": layout.block_bytes,
        "dram_blocks_per_host": size.dram_blocks, "ssd_blocks_per_host": size.ssd_capacity_blocks,
        "capacity_blocks": capacity, "remote": args.remote or "", **ideal, "goals": GOALS}

    base = args.dir or Path(tempfile.gettempdir())
    _check_disk(base, args.hosts * size.ssd_bytes)
    workdir = Path(tempfile.mkdtemp(prefix="kvstore-bench-trace-", dir=base))
    try:
        routes = ["single"] if args.hosts == 1 else (
            ["round-robin", "kv-aware"] if args.route in (None, "both") else [args.route])
        runs = {}
        for route in routes:
            runs[route] = _replay_one(args, trace, size, args.hosts, route, workdir / route)
        primary = runs["kv-aware" if "kv-aware" in runs else routes[0]]
        result.update({k: primary[k] for k in (
            "hit_ratio", "served_fraction", "recomputed_fraction", "requests_per_s",
            "replay_speed_x", "wall_s", "requests_per_host", "load_max_over_mean")})
        result["routes"] = runs
        result["wrong_bytes"] = sum(r["wrong_bytes"] for r in runs.values())
        result["errors"] = sum(r["errors"] for r in runs.values())
        if len(runs) == 2:
            rr = runs["round-robin"]["hit_ratio"]
            result["routing_gain"] = runs["kv-aware"]["hit_ratio"] / rr if rr else 0.0
        if args.hosts > 1 and not args.no_shared:
            shared_size = HostSize(args.hosts * size.dram_blocks,
                                   args.hosts * size.ssd_capacity_blocks, layout)
            shared = _replay_one(args, trace, shared_size, 1, "shared", workdir / "shared")
            result["shared"] = shared
            result["shared_cache_hit_ratio"] = shared["hit_ratio"]
            result["kv_vs_shared"] = (result["hit_ratio"] / shared["hit_ratio"]
                                      if shared["hit_ratio"] else 0.0)
            result["wrong_bytes"] += shared["wrong_bytes"]
            result["errors"] += shared["errors"]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def _check_disk(base: Path, ssd_bytes: int) -> None:
    """The SSD tiers' slab files are preallocated: refuse a run whose fleet (one at a time:
    each replay's fleet is gone before the next starts) would take more than 90% of the free
    space, rather than fill the disk."""
    if not ssd_bytes:
        return
    st = os.statvfs(base)
    free = st.f_bavail * st.f_frsize
    if ssd_bytes > 0.9 * free:
        raise SystemExit(f"kvstore bench trace: the SSD tiers need {ssd_bytes / 1e9:.1f} GB of "
                         f"preallocated slab files and {base} has {free / 1e9:.1f} GB free: "
                         "use fewer --ssd-tokens or --hosts, or --dir on a larger disk")


def _replay_one(args, trace, size, hosts: int, route: str, workdir: Path) -> dict:
    """One replay on a fresh fleet (and, with --remote, a fresh engine: no replay starts with
    another's blocks); its ReplayResult as a dict (plus router figures)."""
    from kvstore.bench.trace.hosts import Fleet
    from kvstore.bench.trace.replay import replay
    from kvstore.bench.trace.routing import KVAwareRouter, RoundRobin
    from kvstore.bench.trace.workload import MODEL_ID

    kv_aware = route == "kv-aware"
    _say(args, f"{route}: starting {hosts} daemon(s) of {size.dram_blocks} DRAM + "
               f"{size.ssd_capacity_blocks} SSD blocks ...")
    remote_args = ("--remote-deadline-s", "1", "--remote-read-deadline-s", "5")
    engine = fleet = index = None
    try:
        remote_url = None
        if args.remote:
            from kvstore.bench.cluster_engines import start_engine
            engine = start_engine(args.remote, workdir / "engine")
            remote_url = engine.url
        fleet = Fleet.start(hosts, size, workdir / "hosts", MODEL_ID, remote_url, remote_args,
                            events=kv_aware)
        before_pick = None
        if kv_aware:
            from kvstore.bench.trace.index import EventIndex
            index = EventIndex([(h.events_endpoint, h.replay_endpoint) for h in fleet.hosts])
            router = KVAwareRouter(hosts, index, args.load_bound, args.load_window)
            before_pick = index.poll
        else:
            router = RoundRobin(hosts)
        n = len(trace.requests)
        res = replay(trace, fleet, router, pace_x=args.speed, inflight=args.inflight,
                     before_pick=before_pick,
                     progress=None if args.quiet else
                     lambda i: _say(args, f"  {route}: {i}/{n} requests"))
        out = res.to_json()
        if index is not None:
            index.poll()
            out["event_batches_applied"] = index.batches_applied
            out["event_gaps"] = index.gaps()
            out["index_orphans"] = index.orphans
            out["index_rejected"] = index.rejected
            out["routed_overlap_blocks"] = router.overlap_blocks
        _say(args, f"  {route}: hit ratio {out['hit_ratio']:.3f}, "
                   f"{out['requests_per_s']:.0f} requests/s")
        return out
    finally:
        if index is not None:
            index.close()
        if fleet is not None:
            fleet.close()
        if engine is not None:
            engine.stop()


def render(r: dict) -> list[str]:
    cap = r["capacity_blocks"]
    lines = [f"kvstore bench trace: {r['requests']} requests, {r['block_refs']} block references "
             f"of {TRACE_BLOCK_TOKENS} tokens, {r['hosts']} host(s) of "
             f"{r['dram_blocks_per_host']} DRAM + {r['ssd_blocks_per_host']} SSD blocks "
             f"({r['block_bytes']} B each){', remote ' + r['remote'] if r['remote'] else ''}",
             f"  ideal, one cache of {cap} blocks:  infinite {r['infinite_hit_ratio']:.3f}   "
             f"Belady {r['belady_hit_ratio']:.3f}   LRU {r['lru_hit_ratio']:.3f}"
             + ("   (the cluster tier is beyond this capacity)" if r["remote"] else "")]
    for name, run in list(r["routes"].items()) + (
            [("shared", r["shared"])] if "shared" in r else []):
        tiers = "  ".join(f"{t} {f:.3f}" for t, f in run["served_fraction"].items())
        lines.append(
            f"  {name:<12} hit {run['hit_ratio']:.3f} ({tiers}; recomputed "
            f"{run['recomputed_fraction']:.3f})  = {_ratio(run['hit_ratio'], r['lru_hit_ratio'])} "
            f"LRU, {_ratio(run['hit_ratio'], r['infinite_hit_ratio'])} infinite")
        lines.append(
            f"  {'':<12} {run['requests_per_s']:.0f} requests/s = {run['replay_speed_x']:.1f}x "
            f"real time; requests per host {run['requests_per_host']} (max/mean "
            f"{run['load_max_over_mean']:.2f}); wrong bytes {run['wrong_bytes']}; "
            f"errors {run['errors']}{' (' + run['first_error'] + ')' if run['errors'] else ''}")
    if "routing_gain" in r:
        lines.append(f"  routing_gain (kv-aware / round robin) {r['routing_gain']:.2f} "
                     f"(goal >= {GOALS['routing_gain']:g})")
    if "kv_vs_shared" in r:
        lines.append(f"  kv-aware / shared cache {r['kv_vs_shared']:.2f} (goal >= "
                     f"{GOALS['kv_vs_shared']:g}); load max/mean {r['load_max_over_mean']:.2f} "
                     f"(goal <= {GOALS['load_max_over_mean']:g})")
    return lines


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"
