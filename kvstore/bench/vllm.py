"""`kvstore bench vllm`: TTFT of requests sharing a long prefix, through vLLM on CPU, with and
without the kvstore connector, in one run.

Each request is the shared prefix (default 2048 tokens) plus its own suffix, generating one
token, so the time of ``generate`` is its time to first token. Both engines run with vLLM's own
prefix cache off: the baseline recomputes the prefix every time, the connector engine computes
it once (the "cold" request, which also stores it) and then loads it from the daemon. Printed:
median TTFT of each, and baseline / warm as the speedup. Tiers: DRAM (extra daemon flags, e.g.
an SSD tier, go through --daemon-args).

``--peer lmcache`` adds a third engine, the same vLLM with LMCache's connector and its
multi-process cache server (kvstore.bench.lmcache_peer), run in the same environment on the same
model and prompts. The engines take turns request by request (the order rotates every round),
so machine noise hits all alike; printed besides: LMCache's hit TTFT, kvstore / LMCache (goal
<= 0.7) and each cache's speedup over no cache, all medians of the same rounds. Every engine's
greedy tokens are compared: the first token of every timed request, and a longer greedy
continuation of one more prompt sharing the prefix.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kvstore.bench import vllm_slow
from kvstore.bench.lmcache_peer import QUIET_ENV, LMCacheServer, find_lmcache_python
from kvstore.bench.vllm_engine import MODEL_SHAPES, EngineProcess, find_vllm_python, make_model
from kvstore.core.units import parse_rate
from kvstore.testing.daemon import DaemonProcess

GOAL_VS_PEER = 0.7   # kvstore's hit TTFT at most this fraction of the peer's
PEER_NAMES = {"lmcache": "LMCache"}


class PeerUnavailable(RuntimeError):
    """The peer asked for cannot run here (no environment): exit code 2, with how to fix it."""


def tokens_agree(first_tokens: dict[str, list[int]], continuations: dict[str, list[int]],
                 ref: str, skip: tuple[str, ...] = ()) -> bool:
    """Whether every engine but ``skip`` generated ``ref``'s greedy tokens (every first token
    and the continuation). The exactness reference for a cache is vLLM's own prefix cache
    ("vllm-apc": the same KV bytes, never recomputed); a cold prefill ("none") can differ from
    it where two bf16 logits tie (docs/integrations/vllm.md)."""
    return all(first_tokens[n] == first_tokens[ref] and continuations[n] == continuations[ref]
               for n in first_tokens if n not in skip)


def _timed(eng: EngineProcess, prompt: list[int]) -> tuple[float, int, int]:
    """(TTFT s, first token, cached prompt tokens) of one request generating one token."""
    r = eng.generate([prompt], max_tokens=1)
    return r["elapsed_s"], r["outputs"][0][0], r["num_cached_tokens"][0]


def _environment(args) -> str:
    if args.peer == "lmcache":
        py, why = find_lmcache_python(args.lmcache_python)
        if py is None:
            raise PeerUnavailable(why)
        return py
    py = find_vllm_python()
    if py is None:
        raise RuntimeError("no vLLM environment found (set KVSTORE_VLLM_PYTHON; see "
                           "docs/integrations/vllm.md)")
    return py


def run(args) -> dict:
    py = _environment(args)
    vocab = MODEL_SHAPES[args.shape][5]
    rng = random.Random(0)
    toks = lambda n: [rng.randrange(vocab) for _ in range(n)]  # noqa: E731
    prefix = toks(args.prefix_tokens)
    prompts = [prefix + toks(args.suffix_tokens) for _ in range(args.requests)]
    check_prompt = prefix + toks(args.suffix_tokens)
    # Warm-up: a prompt of another prefix, then that prefix again with another suffix, so each
    # cache's hit path (lazy set-up, first transfer) is warm before anything is timed.
    other = toks(args.prefix_tokens)
    warmup = [other + toks(args.suffix_tokens) for _ in range(2)]
    max_len = args.prefix_tokens + args.suffix_tokens + max(64, args.check_tokens + 8)

    workdir = Path(tempfile.mkdtemp(prefix="kvstore-bench-vllm-"))
    try:
        if args.slow_tier:
            r = vllm_slow.run(args, py, workdir)
        else:
            r = _measure(args, py, workdir, prompts, check_prompt, warmup, max_len)
    except BaseException as exc:
        # The engines' and servers' logs say why: keep them (the model is rebuilt each run).
        shutil.rmtree(workdir / "model", ignore_errors=True)
        if isinstance(exc, (RuntimeError, TimeoutError)):
            raise RuntimeError(f"{exc} (logs kept in {workdir})") from exc
        raise
    shutil.rmtree(workdir, ignore_errors=True)
    return r


def _measure(args, py: str, workdir: Path, prompts: list[list[int]], check_prompt: list[int],
             warmup: list[list[int]], max_len: int) -> dict:
    with contextlib.ExitStack() as stack:
        model = str(workdir / "model")
        make_model(py, model, args.shape)
        daemon = DaemonProcess.private(2 << 30, extra_args=shlex.split(args.daemon_args)).start()
        stack.callback(daemon.close)
        # name -> engine; "none" recomputes everything, the others load the shared prefix.
        engines = {"none": stack.enter_context(EngineProcess(
                       py, model, max_model_len=max_len, log_path=str(workdir / "baseline.log"))),
                   "kvstore": stack.enter_context(EngineProcess(
                       py, model, daemon.socket, max_model_len=max_len,
                       extra_config=json.loads(args.kv_config),
                       log_path=str(workdir / "connector.log")))}
        if args.peer == "lmcache":
            server = stack.enter_context(LMCacheServer(py, str(workdir / "lmcache-server.log")))
            engines["lmcache"] = stack.enter_context(EngineProcess(
                py, model, max_model_len=max_len, peer_transfer=server.connector_config(),
                env=QUIET_ENV, log_path=str(workdir / "lmcache-engine.log")))
        if args.floor:
            # vLLM's own prefix cache: the prefix stays in the engine's KV pages, nothing moves.
            # Its hit TTFT is the floor any external cache can reach (the suffix's compute).
            engines["vllm-apc"] = stack.enter_context(EngineProcess(
                py, model, max_model_len=max_len, prefix_caching=True,
                log_path=str(workdir / "apc.log")))
        names = list(engines)
        for w in warmup:
            for n in names:
                _timed(engines[n], w)
            time.sleep(0.5)  # the stores of the first complete in the background
        # The first request sharing the prefix: computed (and stored by each cache).
        first = {n: _timed(engines[n], prompts[0]) for n in names}
        time.sleep(0.5)  # the cold requests' stores complete in the background
        ttft: dict[str, list[float]] = {n: [] for n in names}
        before = engines["kvstore"].stats()
        cached: dict[str, list[int]] = {n: [] for n in names}
        first_tokens: dict[str, list[int]] = {n: [first[n][1]] for n in names}
        for i, p in enumerate(prompts[1:]):
            for n in names[i % len(names):] + names[:i % len(names)]:   # rotate who goes first
                t, tok, c = _timed(engines[n], p)
                ttft[n].append(t)
                first_tokens[n].append(tok)
                cached[n].append(c)
        engine_ms = _engine_ms_per_hit(before, engines["kvstore"].stats(), len(prompts) - 1)
        continuation = {n: engines[n].generate([check_prompt], max_tokens=args.check_tokens)
                        ["outputs"][0] for n in names}
        counters = engines["kvstore"].stats()
    med = {n: statistics.median(v) for n, v in ttft.items()}
    same_tokens = tokens_agree(first_tokens, continuation, "none")
    same_as_floor = (tokens_agree(first_tokens, continuation, "vllm-apc", skip=("none",))
                     if "vllm-apc" in names else None)
    r = {
        "model_shape": args.shape, "prefix_tokens": args.prefix_tokens,
        "suffix_tokens": args.suffix_tokens, "requests": args.requests,
        "ttft_baseline_s": med["none"], "ttft_connector_cold_s": first["kvstore"][0],
        "ttft_connector_warm_s": med["kvstore"],
        "speedup_warm_vs_baseline": med["none"] / med["kvstore"],
        "cold_overhead_vs_baseline": first["kvstore"][0] / first["none"][0],
        "loaded_blocks": counters.get("worker", {}).get("loaded_blocks"),
        "sync_loads": counters.get("scheduler", {}).get("sync_loads"),
        "async_loads": counters.get("scheduler", {}).get("async_loads"),
        "loaded_bytes": counters.get("worker", {}).get("loaded_bytes"),
        "stored_bytes": counters.get("worker", {}).get("stored_bytes"),
        "ttft_baseline_all_s": ttft["none"], "ttft_connector_warm_all_s": ttft["kvstore"],
        "cached_tokens_connector_warm": cached["kvstore"],
        "tokens_identical": same_tokens, "tokens_identical_to_floor": same_as_floor,
        "check_tokens": args.check_tokens,
        "first_tokens": first_tokens, "continuations": continuation,
        "peer": args.peer,
        # the connector's time on the engine's thread per timed hit, by hook (ms)
        "connector_engine_ms_per_hit": engine_ms,
    }
    if args.floor:
        r.update({
            "ttft_floor_warm_s": med["vllm-apc"], "ttft_floor_warm_all_s": ttft["vllm-apc"],
            "cached_tokens_floor_warm": cached["vllm-apc"],
            "connector_overhead_over_floor_s": med["kvstore"] - med["vllm-apc"],
            # the goal: a hit as fast as vLLM's own prefix cache (docs/integrations/vllm.md, "Load modes")
            "hit_over_floor": med["kvstore"] / med["vllm-apc"],
        })
        if args.peer:
            r["peer_overhead_over_floor_s"] = med[args.peer] - med["vllm-apc"]
            r["peer_hit_over_floor"] = med[args.peer] / med["vllm-apc"]
    if args.peer:
        r.update({
            "ttft_peer_cold_s": first[args.peer][0], "ttft_peer_warm_s": med[args.peer],
            "ttft_peer_warm_all_s": ttft[args.peer],
            "cached_tokens_peer_warm": cached[args.peer],
            "speedup_peer_warm_vs_baseline": med["none"] / med[args.peer],
            "kvstore_vs_peer_warm": med["kvstore"] / med[args.peer],
            "goal_kvstore_vs_peer_warm": GOAL_VS_PEER,
        })
    return r


def _engine_ms_per_hit(before: dict, after: dict, hits: int) -> dict:
    """Per timed hit, the milliseconds the connector held the engine's thread in each hook
    (the ``*_us`` counters: kvstore.client.vllm.stats), from two snapshots of the counters."""
    out = {}
    for half, keys in (("scheduler", ("lookup_us",)),
                       ("worker", ("load_us", "save_us", "finish_us"))):
        for k in keys:
            d = after.get(half, {}).get(k, 0) - before.get(half, {}).get(k, 0)
            out[k[:-3]] = d / 1e3 / max(1, hits)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kvstore bench vllm", description=__doc__.split("\n\n")[0],
                                 allow_abbrev=False)
    ap.add_argument("--shape", choices=sorted(MODEL_SHAPES), default="small",
                    help="random-weight Llama shape (1b: the Llama-3.2-1B shape; slow on CPU)")
    ap.add_argument("--prefix-tokens", type=int, default=2048)
    ap.add_argument("--suffix-tokens", type=int, default=32)
    ap.add_argument("--requests", type=int, default=4,
                    help="requests sharing the prefix (>= 2): one cold, the rest timed rounds")
    ap.add_argument("--check-tokens", type=int, default=8,
                    help="greedy tokens of the continuation compared across engines")
    ap.add_argument("--daemon-args", default="", help="extra `kvstore serve` flags")
    ap.add_argument("--kv-config", default="{}", metavar="JSON",
                    help="extra kv_connector_extra_config keys of the kvstore engine, e.g. "
                         "'{\"sync_load_max_bytes\": 0}' (every hit loads asynchronously)")
    ap.add_argument("--peer", choices=sorted(PEER_NAMES),
                    help="also run vLLM with this cache (lmcache: LMCache's MP server), "
                         "interleaved, and print kvstore / peer")
    ap.add_argument("--lmcache-python", metavar="PATH",
                    help="python of a vLLM environment with lmcache and kvstore "
                         "(default: $KVSTORE_LMCACHE_PYTHON, then .venv-lmcache)")
    ap.add_argument("--floor", action="store_true",
                    help="also run vLLM with its own prefix cache (no transfer at all): the "
                         "hit TTFT floor, and each cache's overhead above it")
    ap.add_argument("--slow-tier", choices=["ssd"],
                    help="instead: the slow-tier sweep (kvstore.bench.vllm_slow): TTFT of a "
                         "prefix hit on a throttled SSD loaded whole, recomputed, and as the "
                         "connector's planner splits it")
    ap.add_argument("--ssd-read-limit", default="auto", metavar="RATES",
                    help="--slow-tier: the SSD read limits swept, e.g. 25MB/s,100MB/s (auto: "
                         "0.25x to 4x the measured crossover)")
    ap.add_argument("--dram-prefix-tokens", type=int, default=0, metavar="T",
                    help="--slow-tier: the first T tokens' blocks (a multiple of vLLM's block "
                         "size) read back into DRAM before timing; the rest stays on SSD")
    ap.add_argument("--stream", action="store_true",
                    help="--slow-tier: also time a fourth engine, planned with the connector's "
                         "stream_slow_loads (SSD blocks arrive layer by layer while the forward "
                         "runs; the planner counts the overlap)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.requests < 2:
        ap.error("--requests must be at least 2")
    if args.check_tokens < 1:
        ap.error("--check-tokens must be at least 1")
    try:
        if not isinstance(json.loads(args.kv_config), dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        ap.error(f"--kv-config: {exc}")
    if args.lmcache_python and args.peer != "lmcache":
        ap.error("--lmcache-python needs --peer lmcache")
    if args.slow_tier:
        if args.peer or args.floor:
            ap.error("--slow-tier goes without --peer and --floor")
        if not 0 <= args.dram_prefix_tokens < args.prefix_tokens:
            ap.error("--dram-prefix-tokens must be in [0, --prefix-tokens)")
        if args.ssd_read_limit != "auto":
            try:
                if not [parse_rate(x) for x in args.ssd_read_limit.split(",") if x.strip()]:
                    raise ValueError("no rate given")
            except ValueError as exc:
                ap.error(f"--ssd-read-limit: {exc}")
    elif args.dram_prefix_tokens or args.ssd_read_limit != "auto" or args.stream:
        ap.error("--ssd-read-limit, --dram-prefix-tokens and --stream go with --slow-tier")
    try:
        r = run(args)
    except PeerUnavailable as exc:
        print(f"kvstore bench vllm: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, TimeoutError, subprocess.CalledProcessError) as exc:
        print(f"kvstore bench vllm: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    if args.slow_tier:
        vllm_slow.report(r)
        return 0
    print(f"vLLM CPU, {args.shape} Llama shape, {args.prefix_tokens}-token shared prefix + "
          f"{args.suffix_tokens}-token suffix, median of {args.requests - 1} warm requests")
    print(f"  TTFT without connector      {r['ttft_baseline_s'] * 1e3:9.1f} ms")
    print(f"  TTFT with connector, cold   {r['ttft_connector_cold_s'] * 1e3:9.1f} ms "
          f"({r['cold_overhead_vs_baseline']:.2f}x baseline: computes and stores)")
    print(f"  TTFT with connector, warm   {r['ttft_connector_warm_s'] * 1e3:9.1f} ms "
          f"({r['speedup_warm_vs_baseline']:.2f}x faster than baseline)")
    if args.peer:
        peer = PEER_NAMES[args.peer]
        print(f"  TTFT with {peer}, cold{' ' * (13 - len(peer))}{r['ttft_peer_cold_s'] * 1e3:9.1f} ms")
        print(f"  TTFT with {peer}, warm{' ' * (13 - len(peer))}{r['ttft_peer_warm_s'] * 1e3:9.1f} ms "
              f"({r['speedup_peer_warm_vs_baseline']:.2f}x faster than baseline)")
        met = "met" if r["kvstore_vs_peer_warm"] <= GOAL_VS_PEER else "NOT met"
        print(f"  kvstore / {peer} hit TTFT   {r['kvstore_vs_peer_warm']:9.2f}x "
              f"(goal <= {GOAL_VS_PEER}x: {met})")
        print(f"  prompt tokens served from cache per warm request: kvstore "
              f"{r['cached_tokens_connector_warm']}, {peer} {r['cached_tokens_peer_warm']}")
    if args.floor:
        print(f"  TTFT with vLLM's prefix cache {r['ttft_floor_warm_s'] * 1e3:7.1f} ms (the floor: "
              f"nothing moves); above it: kvstore "
              f"{r['connector_overhead_over_floor_s'] * 1e3:.1f} ms "
              f"({r['hit_over_floor']:.2f}x the floor)"
              + (f", {PEER_NAMES[args.peer]} {r['peer_overhead_over_floor_s'] * 1e3:.1f} ms "
                 f"({r['peer_hit_over_floor']:.2f}x)" if args.peer else ""))
    e = r["connector_engine_ms_per_hit"]
    print(f"  kvstore's time on the engine's thread per warm hit {sum(e.values()):.1f} ms: "
          + ", ".join(f"{k} {v:.1f}" for k, v in e.items()))
    engines = "no cache, kvstore" + (f", {PEER_NAMES[args.peer]}" if args.peer else "")
    engines += ", vLLM's prefix cache" if args.floor else ""
    if r["tokens_identical"]:
        print(f"  greedy tokens identical across {engines} (every first token and a "
              f"{args.check_tokens}-token continuation)")
    elif r["tokens_identical_to_floor"]:
        print(f"  greedy tokens of every cache identical to vLLM's own prefix cache's (every "
              f"first token and a {args.check_tokens}-token continuation); the cold prefill "
              f"differs (a bf16 tie): first tokens {r['first_tokens']}")
    else:
        print(f"  greedy tokens DIFFER across {engines}: first tokens {r['first_tokens']}, "
              f"continuations {r['continuations']}")
    return 0
