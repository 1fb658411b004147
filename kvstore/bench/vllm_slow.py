"""`kvstore bench vllm --slow-tier ssd`: TTFT of a prefix hit on a slow SSD through vLLM, loaded
whole, recomputed, and as the connector's planner splits it, across SSD read bandwidths.

Three engines run side by side on one daemon with an SSD tier (write-through):
  recompute-all  vLLM without the connector (its prefill times also give the prefill profile)
  load-all       the connector without a prefill profile: every hit loads all it found
  planned        the connector with the measured profile (prefill_profile): a hit on a slow
                 tier loads only the prefix that pays, vLLM computes the rest
  streamed       (--stream) planned, with stream_slow_loads and layerwise_load: the SSD
                 blocks arrive layer by layer while the forward runs the layers already
                 there, and the planner counts that overlap
For each limit in ``--ssd-read-limit`` the daemon restarts with ``ssd_read_limit`` at that rate
(a restart leaves every block on SSD only: the disk is the slow tier, DRAM holds nothing);
``--dram-prefix-tokens T`` then reads the first T tokens' blocks of each timed prompt back into
DRAM (a chain's roots, which many prompts share, stay in DRAM while its tail is demoted). Each
timed request is a prompt whose prefix was stored before the restart, generating one token.
Printed per limit: the median TTFT of each mode, planned / min(load-all, recompute-all) (goal
<= 1.05) and min / planned (the gain; goal >= 1.3 at the crossover, the limit where load-all
and recompute-all are closest); with --stream the same two for the streamed engine. Greedy tokens of every timed request are compared with the
no-cache engine's.
"""
from __future__ import annotations

import contextlib
import random
import statistics
import sys
import time
from pathlib import Path

from kvstore.bench.vllm_engine import MODEL_SHAPES, EngineProcess, make_model
from kvstore.core.units import format_bytes, parse_rate
from kvstore.planner.recompute import PrefillProfile
from kvstore.testing.daemon import DaemonProcess

GOAL_VS_MIN = 1.05        # planned at most this times min(load-all, recompute-all)
GOAL_CROSSOVER_GAIN = 1.3  # and this much faster than both at the crossover
# The connector retries a restarted daemon soon (the default backoff is 1 s).
_KV = {"retry_s": 0.2, "lookup_timeout_s": 2.0, "io_timeout_s": 30.0, "load_timeout_s": 60.0}


def kv_bytes_per_token(shape: str) -> int:
    hidden, layers, heads, kv_heads, _inter, _vocab = MODEL_SHAPES[shape]
    return layers * 2 * kv_heads * (hidden // heads) * 2        # K and V, bf16


def run(args, py: str, workdir: Path) -> dict:
    vocab = MODEL_SHAPES[args.shape][5]
    rng = random.Random(0)
    toks = lambda n: [rng.randrange(vocab) for _ in range(n)]  # noqa: E731
    n_tok = args.prefix_tokens + args.suffix_tokens
    reps = args.requests - 1
    prefix_bytes = args.prefix_tokens * kv_bytes_per_token(args.shape)
    max_len = n_tok + 64
    sizes = ["--dram-bytes", "64MiB", "--chunk-bytes", "16MiB"]
    base = ["--ssd-dir", str(workdir / "ssd"), "--ssd-bytes", "8GiB",
            "--ssd-segment-bytes", "256MiB", "--ssd-write-policy", "write_through"]
    with contextlib.ExitStack() as stack:
        model = str(workdir / "model")
        make_model(py, model, args.shape)
        daemon = DaemonProcess.private(64 << 20, 16 << 20, extra_args=base).start(timeout_s=60)
        stack.callback(daemon.close)
        none = stack.enter_context(EngineProcess(
            py, model, max_model_len=max_len, log_path=str(workdir / "baseline.log")))
        profile, samples = _profile(none, toks, n_tok)
        n = args.prefix_tokens   # the prefix's compute, without a forward's fixed cost
        crossover = prefix_bytes / (profile.c1 * n + profile.c2 * n * n)
        if args.ssd_read_limit == "auto":   # around where loading the prefix costs its compute
            limits = [int(f * crossover) for f in (0.25, 1.0, 4.0)]
        else:
            limits = [parse_rate(x) for x in args.ssd_read_limit.split(",") if x.strip()]
        # per limit: the load-all engine's and the planned engine's prompts (distinct prefixes:
        # a hit promotes its blocks into DRAM)
        _progress(f"prefill profile {profile} from {samples}; crossover ~{crossover / 1e6:.1f} MB/s;"
                  f" limits {[format_bytes(x) + '/s' for x in limits]}")
        modes = ["load-all", "planned"] + (["streamed"] if getattr(args, "stream", False) else [])
        prompts = {(lim, mode): [toks(n_tok) for _ in range(reps)]
                   for lim in limits for mode in modes}
        planned = {**_KV, "prefill_profile": [profile.c0, profile.c1, profile.c2]}
        configs = {"load-all": _KV, "planned": planned,
                   "streamed": {**planned, "layerwise_load": True, "stream_slow_loads": True}}
        engines = {mode: stack.enter_context(EngineProcess(
                       py, model, daemon.socket, max_model_len=max_len,
                       extra_config=configs[mode], log_path=str(workdir / f"{mode}.log")))
                   for mode in modes}
        warm = {mode: toks(args.prefix_tokens // 2) for mode in engines}
        # 2 blocks each (vLLM's CPU block: 128 tokens), read untimed at each limit
        disk = {(lim, mode): toks(257) for lim in limits for mode in engines}
        for mode, eng in engines.items():        # store the prompts (and the untimed ones)
            for p in [warm[mode], *(p for lim in limits for p in prompts[(lim, mode)]),
                      *(disk[(lim, mode)] for lim in limits)]:
                eng.generate([p], 1)
        time.sleep(1.0)                           # the last puts land
        points = []
        for lim in [0, *limits]:                  # 0: unthrottled, to warm the SSD hit path
            daemon.stop()
            daemon.args = [*sizes, *base, "--ssd-read-limit", str(lim)]
            daemon.start(timeout_s=120)
            for eng in engines.values():
                _reconnect(eng, toks)
            if not lim:   # each engine's first SSD hit (an asynchronous load), untimed
                for mode, eng in engines.items():
                    eng.generate([warm[mode] + toks(8)], 1)
                continue
            if args.dram_prefix_tokens:
                for mode in engines:
                    for p in prompts[(lim, mode)]:   # through load-all: it loads what it finds
                        engines["load-all"].generate(
                            [p[:args.dram_prefix_tokens] + toks(1)], 1)
            # untimed: a short read of the throttled disk, so the daemon answers the planner
            # with a measured bandwidth, as a serving daemon would from recent reads; then
            # the planned engine's first plan (its scheduler's first call on the restarted
            # daemon: a serving engine's channel is connected already)
            for mode, eng in engines.items():
                eng.generate([disk[(lim, mode)][:256] + toks(1)], 1)
            points.append(_point(lim, none, engines, prompts, reps, len(points)))
            _progress({k: v for k, v in points[-1].items() if k != "ttft_all_s"})
        counters = {m: e.stats() for m, e in engines.items()}
    streamed = "streamed" in counters
    for p in points:
        best = min(p["ttft_load_all_s"], p["ttft_recompute_all_s"])
        p["planned_over_min"] = p["ttft_planned_s"] / best
        p["gain_vs_best_extreme"] = best / p["ttft_planned_s"]
        if streamed:
            p["streamed_over_min"] = p["ttft_streamed_s"] / best
            p["streamed_gain_vs_best_extreme"] = best / p["ttft_streamed_s"]
    cross = min(points, key=lambda p: abs(p["ttft_load_all_s"] / p["ttft_recompute_all_s"] - 1))
    extra = {"streamed_over_min_max": max(p["streamed_over_min"] for p in points),
             "streamed_crossover_gain": cross["streamed_gain_vs_best_extreme"]} \
        if streamed else {}
    return {**extra,
        "slow_tier": "ssd", "model_shape": args.shape, "prefix_tokens": args.prefix_tokens,
        "suffix_tokens": args.suffix_tokens, "timed_requests_per_point": reps,
        "dram_prefix_tokens": args.dram_prefix_tokens,
        "prefix_bytes": prefix_bytes,
        "prefill_profile": [profile.c0, profile.c1, profile.c2], "prefill_samples": samples,
        "crossover_estimate_bps": crossover,
        "points": points,
        "planned_over_min_max": max(p["planned_over_min"] for p in points),
        "crossover_ssd_read_limit_bps": cross["ssd_read_limit_bps"],
        "crossover_gain": cross["gain_vs_best_extreme"],
        "goal_planned_over_min": GOAL_VS_MIN, "goal_crossover_gain": GOAL_CROSSOVER_GAIN,
        "tokens_identical": all(p["tokens_identical"] for p in points),
        "counters": counters,
    }


def _progress(what) -> None:
    """A line on stderr: a long sweep shows where it is (stdout carries the result)."""
    print(f"bench vllm --slow-tier: {what}", file=sys.stderr, flush=True)


def _profile(none: EngineProcess, toks, n_tok: int) -> tuple[PrefillProfile, list]:
    """The engine's prefill profile from its own TTFTs: best of 2 at half and at the full
    prompt length, fitted as c1·k (kvstore.planner.recompute.PrefillProfile.fit with two
    lengths). On a shared CPU a quadratic fit of so few points follows the noise."""
    none.generate([toks(256)], 1)                  # warm
    samples = [(n, min(none.generate([toks(n)], 1)["elapsed_s"] for _ in range(2)))
               for n in (n_tok // 2, n_tok)]
    return PrefillProfile.fit(samples), samples


def _reconnect(eng: EngineProcess, toks, timeout_s: float = 60.0) -> None:
    """Requests until one goes through without a fallback: the connector is back on the
    restarted daemon (its first lookup after the restart fails and backs off)."""
    deadline = time.monotonic() + timeout_s
    while True:
        before = eng.stats().get("scheduler", {}).get("fallbacks", 0)
        eng.generate([toks(300)], 1)
        if eng.stats().get("scheduler", {}).get("fallbacks", 0) == before:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the connector did not come back in {timeout_s:g}s")
        time.sleep(0.3)


def _point(lim: int, none: EngineProcess, engines: dict, prompts: dict, reps: int,
           turn: int) -> dict:
    """One limit's timed requests; which connector engine goes first alternates (by ``turn``
    and request), so machine noise hits both alike."""
    ttft = {**{m: [] for m in engines}, "none": []}
    cached = {m: [] for m in engines}
    same = True
    for r in range(reps):
        order = list(engines.items())
        for mode, eng in (order if (turn + r) % 2 == 0 else order[::-1]):
            p = prompts[(lim, mode)][r]
            a = eng.generate([p], 1)
            b = none.generate([p], 1)
            ttft[mode].append(a["elapsed_s"])
            ttft["none"].append(b["elapsed_s"])
            cached[mode].append(a["num_cached_tokens"][0])
            same &= a["outputs"] == b["outputs"]
    med = {m: statistics.median(v) for m, v in ttft.items()}
    out = {"ssd_read_limit_bps": lim, "ssd_read_limit": format_bytes(lim) + "/s",
           "ttft_load_all_s": med["load-all"], "ttft_recompute_all_s": med["none"],
           "ttft_planned_s": med["planned"], "ttft_all_s": ttft,
           "cached_tokens_load_all": cached["load-all"], "cached_tokens_planned": cached["planned"],
           "tokens_identical": same}
    if "streamed" in engines:
        out["ttft_streamed_s"] = med["streamed"]
        out["cached_tokens_streamed"] = cached["streamed"]
    return out


def report(r: dict) -> None:
    print(f"vLLM CPU, {r['model_shape']} Llama shape, {r['prefix_tokens']}-token prefix "
          f"({format_bytes(r['prefix_bytes'])}) + {r['suffix_tokens']}-token suffix on a throttled "
          f"SSD tier" + (f" (first {r['dram_prefix_tokens']} tokens in DRAM)"
                         if r["dram_prefix_tokens"] else "")
          + f", median of {r['timed_requests_per_point']} per point")
    c = r["prefill_profile"]
    print(f"  prefill profile: {c[0] * 1e3:.1f} ms + {c[1] * 1e6:.1f} us/token + "
          f"{c[2] * 1e9:.3f} ns/token^2; estimated crossover "
          f"{format_bytes(r['crossover_estimate_bps'])}/s")
    st = "streamed_over_min_max" in r
    print(f"  {'SSD read limit':>15} {'load all':>10} {'recompute':>10} {'planned':>10} "
          f"{'planned/min':>12} {'gain':>6}"
          + (f" {'streamed':>10} {'streamed/min':>13} {'gain':>6}" if st else "")
          + "  cached tokens (load all / planned" + (" / streamed)" if st else ")"))
    for p in r["points"]:
        print(f"  {p['ssd_read_limit']:>15} {p['ttft_load_all_s'] * 1e3:8.0f}ms "
              f"{p['ttft_recompute_all_s'] * 1e3:8.0f}ms {p['ttft_planned_s'] * 1e3:8.0f}ms "
              f"{p['planned_over_min']:12.2f} {p['gain_vs_best_extreme']:6.2f}"
              + (f" {p['ttft_streamed_s'] * 1e3:8.0f}ms {p['streamed_over_min']:13.2f} "
                 f"{p['streamed_gain_vs_best_extreme']:6.2f}" if st else "")
              + f"  {p['cached_tokens_load_all']} / {p['cached_tokens_planned']}"
              + (f" / {p['cached_tokens_streamed']}" if st else ""))
    ok = r["planned_over_min_max"] <= r["goal_planned_over_min"]
    print(f"  planned / min(load all, recompute all): at most {r['planned_over_min_max']:.2f} "
          f"(goal <= {r['goal_planned_over_min']}: {'met' if ok else 'NOT met'})")
    ok = r["crossover_gain"] >= r["goal_crossover_gain"]
    print(f"  at the crossover ({format_bytes(r['crossover_ssd_read_limit_bps'])}/s) planned is "
          f"{r['crossover_gain']:.2f}x faster than the better extreme (goal >= "
          f"{r['goal_crossover_gain']}: {'met' if ok else 'NOT met'})")
    if st:
        ok = r["streamed_over_min_max"] <= r["goal_planned_over_min"]
        print(f"  streamed / min(load all, recompute all): at most "
              f"{r['streamed_over_min_max']:.2f} (goal <= {r['goal_planned_over_min']}: "
              f"{'met' if ok else 'NOT met'})")
        ok = r["streamed_crossover_gain"] >= r["goal_crossover_gain"]
        print(f"  at the crossover streamed is {r['streamed_crossover_gain']:.2f}x faster than "
              f"the better extreme (goal >= {r['goal_crossover_gain']}: "
              f"{'met' if ok else 'NOT met'})")
    print("  greedy tokens " + ("identical to the no-cache engine's in every timed request"
                                if r["tokens_identical"] else "DIFFER from the no-cache engine's"))

