"""`kvstore bench vllm`: TTFT of requests sharing a long prefix, through vLLM on CPU, with and
without the kvstore connector, in one run.

Each request is the shared prefix (default 2048 tokens) plus its own suffix, generating one
token, so the time of ``generate`` is its time to first token. Both engines run with vLLM's own
prefix cache off: the baseline recomputes the prefix every time, the connector engine computes
it once (the "cold" request, which also stores it) and then loads it from the daemon. Printed:
median TTFT of each, and baseline / warm as the speedup. Tiers: DRAM (extra daemon flags, e.g.
an SSD tier, go through --daemon-args).
"""
from __future__ import annotations

import argparse
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

from kvstore.testing.daemon import DaemonProcess
from kvstore.bench.vllm_engine import MODEL_SHAPES, EngineProcess, find_vllm_python, make_model


def _ttfts(eng: EngineProcess, prompts: list[list[int]]) -> list[float]:
    return [eng.generate([p], max_tokens=1)["elapsed_s"] for p in prompts]


def run(args) -> dict:
    py = find_vllm_python()
    if py is None:
        raise RuntimeError("no vLLM environment found (set KVSTORE_VLLM_PYTHON; see README)")
    vocab = MODEL_SHAPES[args.shape][5]
    rng = random.Random(0)
    toks = lambda n: [rng.randrange(vocab) for _ in range(n)]  # noqa: E731
    prefix = toks(args.prefix_tokens)
    prompts = [prefix + toks(args.suffix_tokens) for _ in range(args.requests)]
    warmup = [toks(args.prefix_tokens + args.suffix_tokens) for _ in range(2)]
    max_len = args.prefix_tokens + args.suffix_tokens + 64

    workdir = Path(tempfile.mkdtemp(prefix="kvstore-bench-vllm-"))
    daemon = None
    try:
        model = str(workdir / "model")
        make_model(py, model, args.shape)
        daemon = DaemonProcess.private(2 << 30, extra_args=shlex.split(args.daemon_args)).start()
        sock = daemon.socket
        # Both engines live side by side and take turns, so machine noise hits both alike.
        with EngineProcess(py, model, max_model_len=max_len,
                           log_path=str(workdir / "baseline.log")) as base_eng, \
             EngineProcess(py, model, sock, max_model_len=max_len,
                           log_path=str(workdir / "connector.log")) as conn_eng:
            for i in range(2):
                _ttfts(base_eng, [warmup[i]])
                _ttfts(conn_eng, [warmup[i]])
            base, warm = [], []
            cold = _ttfts(conn_eng, prompts[:1])[0]
            base += _ttfts(base_eng, prompts[:1])
            time.sleep(0.5)  # the cold request's put completes in the background
            for p in prompts[1:]:
                base += _ttfts(base_eng, [p])
                warm += _ttfts(conn_eng, [p])
            counters = conn_eng.stats()
    finally:
        if daemon is not None:
            daemon.close()
        shutil.rmtree(workdir, ignore_errors=True)
    b, w = statistics.median(base), statistics.median(warm)
    return {
        "model_shape": args.shape, "prefix_tokens": args.prefix_tokens,
        "suffix_tokens": args.suffix_tokens, "requests": args.requests,
        "ttft_baseline_s": b, "ttft_connector_cold_s": cold, "ttft_connector_warm_s": w,
        "speedup_warm_vs_baseline": b / w, "cold_overhead_vs_baseline": cold / b,
        "loaded_blocks": counters.get("worker", {}).get("loaded_blocks"),
        "loaded_bytes": counters.get("worker", {}).get("loaded_bytes"),
        "stored_bytes": counters.get("worker", {}).get("stored_bytes"),
        "ttft_baseline_all_s": base, "ttft_connector_warm_all_s": warm,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kvstore bench vllm", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(MODEL_SHAPES), default="small",
                    help="random-weight Llama shape (1b: the Llama-3.2-1B shape; slow on CPU)")
    ap.add_argument("--prefix-tokens", type=int, default=2048)
    ap.add_argument("--suffix-tokens", type=int, default=32)
    ap.add_argument("--requests", type=int, default=4, help="requests sharing the prefix (>= 2)")
    ap.add_argument("--daemon-args", default="", help="extra `kvstore serve` flags")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.requests < 2:
        ap.error("--requests must be at least 2")
    try:
        r = run(args)
    except (RuntimeError, TimeoutError, subprocess.CalledProcessError) as exc:
        print(f"kvstore bench vllm: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print(f"vLLM CPU, {args.shape} Llama shape, {args.prefix_tokens}-token shared prefix + "
              f"{args.suffix_tokens}-token suffix, median of {args.requests - 1} warm requests")
        print(f"  TTFT without connector      {r['ttft_baseline_s'] * 1e3:9.1f} ms")
        print(f"  TTFT with connector, cold   {r['ttft_connector_cold_s'] * 1e3:9.1f} ms "
              f"({r['cold_overhead_vs_baseline']:.2f}x baseline: computes and stores)")
        print(f"  TTFT with connector, warm   {r['ttft_connector_warm_s'] * 1e3:9.1f} ms "
              f"({r['speedup_warm_vs_baseline']:.2f}x faster than baseline)")
    return 0
