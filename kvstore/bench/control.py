"""`kvstore bench control`: lookups and DRAM gets per second of N same-host client processes
against one daemon, answered from shared memory (kvstore/core/shmindex.py) vs over gRPC.

One private daemon holds one chain of ``--stored`` blocks; every client process looks up the
same ``--keys``-block chain (its first ``--stored`` blocks cached, so each lookup walks a real
prefix) in a loop for ``--seconds``. The same worker processes run both paths in turn at each
client count (``--clients``, default 1,4,16,32), so the only difference is the path:

- grpc:  ``Namespace.lookup`` with local lookups off (one Lookup RPC each, today's path);
- local: ``Namespace.lookup`` answered from the snapshot (no RPC);
- numpy: an in-process probe of the same keys on the mapped snapshot, one thread, no SDK
  (the physical limit of one core).

Per point: aggregate lookups/s, p50 and p99 latency of one lookup, and wrong answers (must be
0). ``lookup_speedup_vs_grpc_16`` = local lookups/s over grpc lookups/s at 16 clients (goal ≥ 20,
with local p99 ≤ 2 ms).

With ``--ops lookup,get`` (the default) the same processes then time DRAM gets of the first
``--get-blocks`` stored blocks (16 KiB each) into a preallocated buffer at each client count,
over the Acquire RPC (``ns.local_gets = False``) and without one (the daemon's snapshot gives
slot and generation: client/namespace.py); every block read back is compared with what was put
(a block of another key or a torn one is a wrong answer). This is the "throughput at 1, 4, 16,
32 client processes" of issue 16: aggregate gets/s and GB/s, p50/p99 of one get.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from kvstore.bench.harness import emit, private_daemon

LAYOUT_ARGS = (2, 2, 64)      # layers, kv heads, head dim: 16 KiB blocks of 16 float16 tokens


def _layout():
    from kvstore.core.layout import KVLayout
    return KVLayout(*LAYOUT_ARGS, block_tokens=16, dtype="float16")


def _keys(ns, n_keys: int) -> list[bytes]:
    return ns.block_keys(list(range(16 * n_keys)))


def _blocks(layout, n: int) -> np.ndarray:
    """What the setup puts: block i is filled with the float16 value i + 1 (exact below 2048)."""
    vals = np.arange(1, n + 1, dtype=np.float16).reshape(n, *([1] * len(layout.block_shape)))
    return np.broadcast_to(vals, (n, *layout.block_shape)).copy()


def _set_path(ns, mode: str) -> None:
    """Both answers of the SDK: from shared memory (local) or from the daemon over gRPC."""
    ns.local_lookups = ns.local_gets = mode == "local"


def _timed(fn, seconds: float) -> list[float]:
    lat = []
    end = time.perf_counter() + seconds
    t = time.perf_counter()
    while t < end:
        fn()
        t2 = time.perf_counter()
        lat.append(t2 - t)
        t = t2
    return lat


def worker(socket: str, n_keys: int, expected: int, get_blocks: int) -> int:
    """A client process: answers "run MODE SECONDS OP" lines on stdin with one JSON line."""
    from kvstore.client import KVClient, Unavailable
    deadline = time.monotonic() + 120
    while True:   # a loaded box can starve the first connection past gRPC's connect timeout
        try:
            c = KVClient(socket=socket, timeout_s=30)
            break
        except Unavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    with c:
        ns = c.namespace("bench-control", _layout())
        keys = _keys(ns, n_keys)
        print(json.dumps({"ready": True, "snapshot": c.index_snapshot is not None}), flush=True)
        want = _blocks(ns.layout, get_blocks)
        out = np.empty_like(want)
        for line in sys.stdin:
            parts = line.split()
            if not parts or parts[0] != "run":
                break
            mode, seconds, op = parts[1], float(parts[2]), parts[3]
            _set_path(ns, mode)
            wrong = 0
            if op == "lookup":
                before = ns.local_lookups_answered

                def one():
                    nonlocal wrong
                    wrong += ns.lookup(keys).num_cached != expected
            else:
                before = ns.local_gets_answered

                def one():
                    nonlocal wrong
                    out.fill(0)     # stale bytes of the previous get must not pass
                    n = len(ns.get(keys[:get_blocks], out=out).result())
                    wrong += n != get_blocks or not np.array_equal(out, want)
            lat = _timed(one, seconds)
            answered = (ns.local_lookups_answered if op == "lookup"
                        else ns.local_gets_answered) - before
            print(json.dumps({"n": len(lat), "seconds": seconds, "wrong": wrong,
                              "local": answered,
                              "lat_us": [round(x * 1e6, 1) for x in lat]}), flush=True)
    return 0


def _numpy_probe(snapshot, tag: int, keys: list[bytes], seconds: float, expected: int) -> dict:
    from kvstore.core.shmindex import prefix
    blob = b"".join(keys)
    wrong = 0

    def one():
        nonlocal wrong
        wrong += prefix(snapshot.probe(tag, blob))[0] != expected
    lat = _timed(one, seconds)
    return _point(len(lat), seconds, wrong, np.asarray(lat))


def _point(n: int, seconds: float, wrong: int, lat_s: np.ndarray) -> dict:
    return {"lookups_per_s": n / seconds, "p50_ms": float(np.percentile(lat_s, 50) * 1e3),
            "p99_ms": float(np.percentile(lat_s, 99) * 1e3), "lookups": n, "wrong": wrong}


def _run(procs, mode: str, seconds: float, op: str = "lookup", block_bytes: int = 0,
         get_blocks: int = 0) -> dict:
    for p in procs:
        p.stdin.write(f"run {mode} {seconds} {op}\n")
        p.stdin.flush()
    outs = [json.loads(p.stdout.readline()) for p in procs]
    lat = np.concatenate([np.asarray(o["lat_us"]) for o in outs]) / 1e6
    pt = _point(sum(o["n"] for o in outs), seconds, sum(o["wrong"] for o in outs), lat)
    pt["answered_locally"] = sum(o["local"] for o in outs)
    if op == "get":
        pt = {"gets_per_s": pt.pop("lookups_per_s"), "gets": pt.pop("lookups"), **pt}
        pt["gb_per_s"] = pt["gets_per_s"] * get_blocks * block_bytes / 1e9
    return pt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kvstore bench control",
                                 description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--clients", default="1,4,16,32", help="client process counts")
    ap.add_argument("--keys", type=int, default=64, help="keys per lookup")
    ap.add_argument("--stored", type=int, default=48, help="leading keys stored")
    ap.add_argument("--seconds", type=float, default=3.0, help="per point and path")
    ap.add_argument("--ops", default="lookup,get", help="what to time: lookup, get or both")
    ap.add_argument("--get-blocks", type=int, default=16,
                    help="blocks per get (of the stored ones; 16 KiB each)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--worker", nargs=4, metavar=("SOCKET", "KEYS", "EXPECTED", "GET_BLOCKS"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.worker[0], int(args.worker[1]), int(args.worker[2]),
                      int(args.worker[3]))
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    if not ops or set(ops) - {"lookup", "get"}:
        print(f"kvstore bench control: --ops must be lookup, get or lookup,get, got {args.ops!r}",
              file=sys.stderr)
        return 2
    try:
        counts = [int(x) for x in args.clients.split(",") if x.strip()]
        if not counts or min(counts) < 1:
            raise ValueError
    except ValueError:
        print(f"kvstore bench control: --clients must be positive integers, got {args.clients!r}",
              file=sys.stderr)
        return 2
    if not 0 <= args.stored <= args.keys or args.keys < 1:
        print("kvstore bench control: need 1 <= --keys and 0 <= --stored <= --keys",
              file=sys.stderr)
        return 2
    if "get" in ops and not 1 <= args.get_blocks <= args.stored:
        print("kvstore bench control: need 1 <= --get-blocks <= --stored", file=sys.stderr)
        return 2

    from kvstore.client import KVClient
    from kvstore.core.shmindex import ShmIndex, ns_tag
    result: dict = {"keys": args.keys, "stored": args.stored, "seconds": args.seconds,
                    "points": {}}
    if "get" in ops:
        result["get_blocks"] = args.get_blocks
        result["get_points"] = {}
    with private_daemon("--dram-bytes", "64MiB", "--chunk-bytes", "4MiB") as sock, \
            KVClient(socket=sock) as setup:
        ns = setup.namespace("bench-control", _layout())
        keys = _keys(ns, args.keys)
        ns.put(keys[:args.stored], _blocks(ns.layout, args.stored)).result()
        block_bytes = ns.layout.block_bytes
        if setup.index_snapshot is None:
            print("kvstore bench control: the daemon offered no index snapshot", file=sys.stderr)
            return 1
        snap = ShmIndex.attach(setup.index_snapshot.path, setup.arena.uuid)
        numpy_pt = _numpy_probe(snap, ns_tag(ns.namespace_id), keys, min(args.seconds, 2.0),
                                args.stored)
        snap.close()
        result["numpy_probe_1thread"] = numpy_pt
        procs: list[subprocess.Popen] = []
        try:
            # Started a few at a time: 32 interpreters importing grpc at once on a small box
            # starve the daemon until their connections time out.
            while len(procs) < max(counts):
                wave = [subprocess.Popen(
                    [sys.executable, "-m", "kvstore.bench", "control", "--worker", sock,
                     str(args.keys), str(args.stored), str(args.get_blocks)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
                    for _ in range(min(4, max(counts) - len(procs)))]
                procs += wave
                for p in wave:
                    hello = p.stdout.readline()
                    if not hello or not json.loads(hello).get("snapshot"):
                        print("kvstore bench control: a worker did not start or mapped no "
                              "snapshot", file=sys.stderr)
                        return 1
            for n in counts:
                if "lookup" in ops:
                    g = _run(procs[:n], "grpc", args.seconds)
                    loc = _run(procs[:n], "local", args.seconds)
                    result["points"][str(n)] = {
                        "grpc": g, "local": loc,
                        "speedup": loc["lookups_per_s"] / g["lookups_per_s"]}
                if "get" in ops:
                    g, loc = (_run(procs[:n], mode, args.seconds, "get", block_bytes,
                                   args.get_blocks) for mode in ("grpc", "local"))
                    result["get_points"][str(n)] = {
                        "grpc": g, "local": loc,
                        "speedup": loc["gets_per_s"] / g["gets_per_s"]}
        finally:
            for p in procs:
                try:
                    p.stdin.close()
                except OSError:
                    pass
            for p in procs:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
    pts = result["points"]
    if "16" in pts:
        result["lookup_speedup_vs_grpc_16"] = pts["16"]["speedup"]
    gpts = result.get("get_points", {})
    if "16" in gpts:
        result["get_speedup_vs_grpc_16"] = gpts["16"]["speedup"]
    result["wrong_answers"] = sum(p["grpc"]["wrong"] + p["local"]["wrong"]
                                  for p in [*pts.values(), *gpts.values()])
    lines = [f"kvstore bench control: {args.keys}-key lookups ({args.stored} stored), "
             f"{args.seconds:g}s per point",
             f"  numpy probe, in-process, 1 thread: {numpy_pt['lookups_per_s']:,.0f}/s "
             f"p50 {numpy_pt['p50_ms']:.3f} ms p99 {numpy_pt['p99_ms']:.3f} ms"]
    if pts:
        lines.append(f"  {'clients':>7} {'grpc/s':>10} {'p50 ms':>7} {'p99 ms':>7} | "
                     f"{'local/s':>10} {'p50 ms':>7} {'p99 ms':>7} | local/grpc")
    for n, p in pts.items():
        g, loc = p["grpc"], p["local"]
        lines.append(f"  {n:>7} {g['lookups_per_s']:>10,.0f} {g['p50_ms']:>7.3f} "
                     f"{g['p99_ms']:>7.2f} | {loc['lookups_per_s']:>10,.0f} {loc['p50_ms']:>7.3f} "
                     f"{loc['p99_ms']:>7.2f} | {p['speedup']:.1f}x")
    if "lookup_speedup_vs_grpc_16" in result:
        lines.append(f"  lookup_speedup_vs_grpc_16: {result['lookup_speedup_vs_grpc_16']:.1f}x "
                     "(goal >= 20x, local p99 <= 2 ms)")
    if gpts:
        lines.append(f"  DRAM gets of {args.get_blocks} x {block_bytes // 1024} KiB blocks:")
        lines.append(f"  {'clients':>7} {'grpc/s':>10} {'GB/s':>6} {'p50 ms':>7} {'p99 ms':>7} | "
                     f"{'local/s':>10} {'GB/s':>6} {'p50 ms':>7} {'p99 ms':>7} | local/grpc")
    for n, p in gpts.items():
        g, loc = p["grpc"], p["local"]
        lines.append(f"  {n:>7} {g['gets_per_s']:>10,.0f} {g['gb_per_s']:>6.2f} "
                     f"{g['p50_ms']:>7.3f} {g['p99_ms']:>7.2f} | {loc['gets_per_s']:>10,.0f} "
                     f"{loc['gb_per_s']:>6.2f} {loc['p50_ms']:>7.3f} {loc['p99_ms']:>7.2f} | "
                     f"{p['speedup']:.1f}x")
    lines.append(f"  wrong answers: {result['wrong_answers']}")
    emit(result, args.json, lines)
    return 0 if result["wrong_answers"] == 0 else 1
