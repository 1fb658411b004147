"""kvstore bench ttft — time to first token with and without a cached prefix, same run.

For a random-weight Llama-shaped model (default ~1B: hidden 2048, 16 layers, 32 heads, 8 kv
heads, bf16) and prompts of each --sizes length (a multiple of the block size), it measures:

  full      plain transformers generate(max_new_tokens=1) on the whole prompt (no kvstore)
  suffix    the same, with the cached prefix already in a DynamicCache in memory: only the
            uncached suffix (the last block, 16 tokens) is computed — the floor no cache can beat
  dram      HFPrefixCache.generate: lease the prefix from the daemon's DRAM tier, copy it layer
            by layer while the model computes (and "dram-whole": copy everything first)
  ssd       the same after the prefix was demoted to the SSD tier (needs a daemon built with
            --ssd-dir/--ssd-bytes; otherwise reported as skipped, with the reason)

and prints speedup = full / reuse and overhead = reuse / suffix, the bytes moved, and the
layer-wise load timeline of one DRAM reuse. Timings are medians of --reps runs (full prefill:
one run). On a 2-core CPU a 2048-token prefill of the 1B shape takes tens of seconds, an
8192-token one minutes — hence the default --sizes 512,2048; add 8192 when you have the time.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time

from kvstore.bench.llama import SHAPE_1B, SHAPE_DEMO, param_count, random_llama
from kvstore.bench.progress import Progress

SHAPES = {"1b": SHAPE_1B, "demo": SHAPE_DEMO}
GOALS = {"dram_speedup": 20.0, "dram_overhead": 1.15, "ssd_speedup": 10.0, "ssd_overhead": 1.5}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kvstore bench ttft", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:]), allow_abbrev=False)
    ap.add_argument("--sizes", default="512,2048",
                    help="prompt lengths in tokens, comma-separated (default 512,2048)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    for dim in ("hidden", "intermediate", "layers", "heads", "kv-heads", "vocab"):
        ap.add_argument(f"--{dim}", type=int, help=f"override the shape's {dim}")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--block-tokens", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3, help="runs per reuse point (median)")
    ap.add_argument("--socket", help="use this running daemon instead of a private one "
                                     "(the SSD point then is skipped)")
    ap.add_argument("--no-ssd", action="store_true", help="skip the SSD point")
    ap.add_argument("--ssd-dir", help="where the private daemon's SSD tier lives "
                                      "(default: a temporary directory in /var/tmp)")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's "
                    "choice; on an oversubscribed machine 1 can be faster)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s]
    except ValueError:
        print(f"kvstore bench ttft: --sizes must be integers, got {args.sizes!r}", file=sys.stderr)
        return 2
    bad = [s for s in sizes if s < 2 * args.block_tokens or s % args.block_tokens]
    if not sizes or bad:
        print(f"kvstore bench ttft: sizes must be multiples of --block-tokens "
              f"{args.block_tokens}, at least two blocks; bad: {bad}", file=sys.stderr)
        return 2
    shape = dict(SHAPES[args.shape])
    for dim in ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab"):
        if getattr(args, dim) is not None:
            shape[dim] = getattr(args, dim)
    try:
        result = run(args, sizes, shape)
    except Exception as exc:  # noqa: BLE001 - a benchmark reports, it does not trace back
        print(f"kvstore bench ttft: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0


def run(args, sizes: list[int], shape: dict) -> dict:
    import torch

    from kvstore.client.hf import HFPrefixCache, layout_for
    from kvstore.testing.daemon import DaemonProcess

    if args.threads:
        torch.set_num_threads(args.threads)
    weights = {s: (s / 512) * (1 + s / 4096) for s in sizes}  # prefill cost, roughly
    reuse_w = 0.15 * args.reps
    prog = Progress(2 + sum(weights[s] + 4 * reuse_w for s in sizes), not args.no_progress)
    prog.step("building the model", 2)
    model = random_llama(**shape, dtype=args.dtype, max_positions=max(sizes) + 64)
    layout = layout_for(model, args.block_tokens)
    with torch.no_grad():  # first-call costs (kernel selection, allocator) out of the timings
        model(torch.zeros((1, 2 * args.block_tokens), dtype=torch.long))
    largest_kv = max(sizes) // args.block_tokens * layout.block_bytes

    ssd_status = "ok"
    daemon = None
    made_ssd_dir = None
    if args.socket:
        socket = args.socket
        ssd_status = "skipped: --socket names an external daemon; the SSD point needs a private one"
    else:
        extra: list[str] = []
        if args.no_ssd:
            ssd_status = "skipped: --no-ssd"
        else:
            ssd_dir = args.ssd_dir
            if not ssd_dir:
                ssd_dir = made_ssd_dir = tempfile.mkdtemp(prefix="kvstore-bench-ssd-",
                                                          dir="/var/tmp")
            extra = ["--ssd-dir", ssd_dir, "--ssd-bytes", str(16 * largest_kv + (1 << 30))]
        # DRAM holds the largest prefix with room to spare but is small enough to demote from
        dram = -(-(2 * largest_kv + (128 << 20)) // (64 << 20)) * (64 << 20)
        try:
            daemon = DaemonProcess.private(dram_bytes=dram, extra_args=extra).start()
        except BaseException:
            if made_ssd_dir:
                shutil.rmtree(made_ssd_dir, ignore_errors=True)
            raise
        socket = daemon.socket
    result: dict = {
        "model": {**shape, "dtype": args.dtype, "params": param_count(model),
                  "block_tokens": args.block_tokens, "block_bytes": layout.block_bytes},
        "torch_threads": torch.get_num_threads(), "reps": args.reps, "goals": GOALS,
        "ssd_status": ssd_status, "points": [],
    }
    try:
        with HFPrefixCache(model, f"bench-ttft-{args.shape}", socket=socket,
                           block_tokens=args.block_tokens, deadline_s=60.0) as kv:
            if kv.stats["fallbacks"] or kv._ns is None:
                raise RuntimeError(f"cannot reach the daemon at {socket}")
            for size in sizes:
                result["points"].append(_point(model, kv, size, args, prog, weights[size],
                                               reuse_w, ssd_status == "ok"))
            result["adapter_stats"] = dict(kv.stats)
    finally:
        prog.done()
        if daemon is not None:
            daemon.close()
        if made_ssd_dir:
            shutil.rmtree(made_ssd_dir, ignore_errors=True)
    return result


def _point(model, kv, size: int, args, prog: Progress, full_w: float, reuse_w: float,
           with_ssd: bool) -> dict:
    import torch
    from transformers import DynamicCache

    gen = dict(max_new_tokens=1, do_sample=False)
    ids = torch.randint(0, model.config.vocab_size, (1, size),
                        generator=torch.Generator().manual_seed(size))
    mask = torch.ones_like(ids)
    reused = size - args.block_tokens
    layout = kv.layout

    prog.step(f"{size} tokens: full prefill", full_w)
    full_cache = DynamicCache(config=model.config)
    with torch.no_grad():
        t = time.perf_counter()
        full_out = model.generate(ids, attention_mask=mask, past_key_values=full_cache, **gen)
        full_s = time.perf_counter() - t
    stored = kv.store(ids, full_cache).result()

    def timed(fn):
        with torch.no_grad():
            t = time.perf_counter()
            out = fn()
            return time.perf_counter() - t, out

    prog.step(f"{size} tokens: suffix forward, cache in memory", reuse_w)
    suffix_runs = []
    for _ in range(args.reps):
        pre = DynamicCache(config=model.config)
        for i, layer in enumerate(full_cache.layers):
            pre.update(layer.keys[..., :reused, :], layer.values[..., :reused, :], i)
        suffix_runs.append(timed(lambda: model.generate(ids, attention_mask=mask,
                                                        past_key_values=pre, **gen)))
    del full_cache

    def reuse(label: str, layerwise: bool, before=None):
        prog.step(f"{size} tokens: reuse from {label}", reuse_w)
        kv.layerwise = layerwise
        runs, tiers = [], []
        for _ in range(args.reps):
            if before is not None:
                before()
            runs.append(timed(lambda: kv.generate(ids, attention_mask=mask, **gen)))
            if kv.last.reused_tokens != reused or kv.last.fallback:
                raise RuntimeError(f"reuse from {label} did not happen: {kv.last}")
            tiers.append(sorted(set(kv.last.tiers)))
        return runs, tiers, kv.last

    dram_runs, dram_tiers, last = reuse("DRAM", True)
    tl = last.timeline
    whole_runs, _, _ = reuse("DRAM, whole prefix first", False)
    kv.layerwise = True

    first = int(full_out[0, -1])
    p = {
        "prompt_tokens": size, "reused_tokens": reused, "computed_tokens": size - reused,
        "full_s": full_s,
        "suffix_s": _median(suffix_runs),
        "dram_s": _median(dram_runs), "dram_whole_s": _median(whole_runs),
        "dram_tiers": dram_tiers[-1], "lookup_s": last.lookup_s,
        "bytes_loaded": reused // args.block_tokens * layout.block_bytes,
        "bytes_stored": stored * layout.block_bytes,
        "same_first_token": {
            "suffix": all(int(o[0, -1]) == first for _, o in suffix_runs),
            "dram": all(int(o[0, -1]) == first for _, o in dram_runs + whole_runs)},
        "timeline_ms": {"loaded": [x * 1e3 for x in tl.loaded_s],
                        "needed": [x * 1e3 for x in tl.needed_s],
                        "waited_until": [x * 1e3 for x in tl.waited_s]},
    }
    if with_ssd:
        demoter = Demoter(kv, ids)
        ssd_runs, ssd_tiers, ssd_last = reuse("SSD", True, before=demoter)
        p["ssd_s"] = _median(ssd_runs)
        p["ssd_lookup_s"] = ssd_last.lookup_s  # the daemon promotes before it answers
        p["ssd_tiers"] = ssd_tiers
        p["ssd_filler_blocks"] = demoter.written
        p["same_first_token"]["ssd"] = all(int(o[0, -1]) == first for _, o in ssd_runs)
    p["dram_speedup"] = full_s / p["dram_s"]
    p["dram_overhead"] = p["dram_s"] / p["suffix_s"]
    p["dram_whole_overhead"] = p["dram_whole_s"] / p["suffix_s"]
    if "ssd_s" in p:
        p["ssd_speedup"] = full_s / p["ssd_s"]
        p["ssd_overhead"] = p["ssd_s"] / p["suffix_s"]
    return p


class Demoter:
    """Pushes a prompt's blocks from DRAM to SSD by filling DRAM with other blocks.

    Generic on purpose: it needs no demotion API, only the daemon's own eviction (DRAM → SSD).
    Raises if the blocks are still not on SSD after writing four DRAM tiers' worth of filler."""

    def __init__(self, kv, ids):
        import torch
        self.kv = kv
        self.ns = kv._namespace()
        self.keys = self.ns.block_keys(ids[0].tolist())
        self.filler = self.ns.client.namespace("bench-ttft-filler", self.ns.layout)
        self.batch = torch.zeros((32, *self.ns.layout.block_shape),
                                 dtype=getattr(torch, self.ns.layout.dtype))
        self.next_token = 0
        self.written = 0

    def __call__(self) -> None:
        B = self.ns.layout.block_tokens
        dram = next((t.capacity_bytes for t in self.ns.client.stats().tiers if t.tier == 2), 0)
        # One DRAM tier's worth of filler per round, and only then a lookup: a lookup counts as
        # a use, and checking after every batch would keep the prefix the most recent thing.
        per_round = -(-max(dram, 1 << 20) // self.ns.layout.block_bytes) + 32
        n = 0
        for _ in range(4):
            written = 0
            while written < per_round:
                toks = list(range(self.next_token, self.next_token + 32 * B))
                self.next_token += 32 * B
                self.filler.put(self.filler.block_keys(toks), self.batch).result()
                written += 32
            n += written
            if self._on_ssd():
                self.written += n
                return
        raise RuntimeError(f"the prefix did not leave DRAM after writing {n} filler blocks "
                           "(four DRAM tiers' worth): is the SSD tier demoting?")

    def _on_ssd(self) -> bool:
        r = self.ns.lookup(self.keys[:-1])
        return r.num_cached == len(self.keys) - 1 and set(r.tiers) == {"SSD"}


def _median(runs) -> float:
    return statistics.median(t for t, _ in runs)


def render(r: dict) -> str:
    m = r["model"]
    lines = [
        f"TTFT, {m['params'] / 1e9:.2f}B-parameter random Llama (hidden {m['hidden']}, "
        f"{m['layers']} layers, {m['heads']} heads / {m['kv_heads']} kv heads, {m['dtype']}), "
        f"{r['torch_threads']} torch threads, median of {r['reps']}",
        f"SSD tier: {r['ssd_status']}",
        "",
        f"{'prompt':>7} {'full':>9} {'suffix':>9} {'DRAM':>9} {'DRAM-whole':>10} {'SSD':>9} "
        f"{'DRAM x':>7} {'DRAM ovh':>8} {'SSD x':>7} {'SSD ovh':>7} {'loaded':>9}",
    ]
    for p in r["points"]:
        ssd = p.get("ssd_s")
        ssd_cols = ((f"{ssd:.3f}s", f"{p['ssd_speedup']:.1f}x", f"{p['ssd_overhead']:.3f}x")
                    if ssd else ("-", "-", "-"))
        lines.append(
            f"{p['prompt_tokens']:>7} {p['full_s']:>8.3f}s {p['suffix_s']:>8.3f}s "
            f"{p['dram_s']:>8.3f}s {p['dram_whole_s']:>9.3f}s {ssd_cols[0]:>9} "
            f"{p['dram_speedup']:>6.1f}x {p['dram_overhead']:>7.3f}x {ssd_cols[1]:>7} "
            f"{ssd_cols[2]:>7} {p['bytes_loaded'] / 2**20:>7.1f}MiB")
    lines += ["", "x = full / reuse (goal at 2048: DRAM >= 20x, SSD >= 10x); "
              "ovh = reuse / suffix-alone (goal: DRAM <= 1.15x, SSD <= 1.5x)"]
    same = all(all(v for v in p["same_first_token"].values()) for p in r["points"])
    lines.append(f"first token identical across full / suffix / reuse: {'yes' if same else 'NO'}")
    p = r["points"][-1]
    tl = p["timeline_ms"]
    if tl["loaded"]:
        lines += ["", f"layer-wise load timeline, {p['prompt_tokens']}-token prompt "
                      f"(ms after the lease; lookup took {p['lookup_s'] * 1e3:.1f} ms):",
                  f"{'layer':>5} {'loaded':>8} {'needed':>8} {'waited':>7}"]
        for i, (lo, ne, wa) in enumerate(zip(tl["loaded"], tl["needed"], tl["waited_until"])):
            lines.append(f"{i:>5} {lo:>8.2f} {ne:>8.2f} {wa - ne:>7.2f}")
        exposed = sum(w - n for n, w in zip(tl["needed"], tl["waited_until"]))
        early = sum(1 for n in tl["needed"] if n < tl["loaded"][-1])
        load = tl["loaded"][-1]
        lines.append(
            f"the loader thread copied all layers in {load:.1f} ms, side by side with generate's "
            f"own setup and compute ({early} layers were computing before the last layer "
            f"arrived); compute waited {exposed:.2f} ms for KV in all: "
            f"{100 * max(0.0, 1 - exposed / load):.0f}% of the load hidden")
    return "\n".join(lines)
