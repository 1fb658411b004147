"""kvstore demo — see a cached prefix cut the time to first token, in one command.

A multi-turn chat over a shared document, run twice on the same small random-weight Llama
(no download, no GPU): once with plain transformers, once through kvstore's adapter. Each turn's
prompt is the document, the conversation so far and a new question, so every turn after the
first finds most of its prompt cached. It prints TTFT per turn for both runs, whether the
generated tokens are identical, and the hit rate. Token ids are random: no tokenizer needed.

It uses the daemon at --socket, else one already running at the default socket, else starts a
private one for the demo and stops it afterwards.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kvstore demo", description=__doc__.splitlines()[0],
                                 epilog="\n".join(__doc__.splitlines()[2:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--socket", help="daemon socket (default: a running daemon, else a private one)")
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--doc-tokens", type=int, default=1024, help="length of the shared document")
    ap.add_argument("--question-tokens", type=int, default=24)
    ap.add_argument("--answer-tokens", type=int, default=8, help="tokens generated per turn")
    ap.add_argument("--model", choices=["small", "tiny"], default="small",
                    help="small: 12M parameters (default); tiny: 1M, for smoke tests")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: the cores "
                    "idle now, per the load average)")
    ap.add_argument("--json", action="store_true")
    return ap


class _FirstTokenClock:
    """A transformers streamer that notes when the first generated token comes out."""

    def __init__(self):
        self.t_first: float | None = None
        self._calls = 0

    def put(self, value) -> None:
        self._calls += 1
        if self._calls == 2 and self.t_first is None:  # call 1 is the prompt itself
            self.t_first = time.perf_counter()

    def end(self) -> None:
        if self.t_first is None:
            self.t_first = time.perf_counter()


def _conversation(generate, turns: int, doc, questions, answer_tokens: int):
    """Run the chat; returns per-turn (prompt tokens, TTFT s, answer ids)."""
    import torch
    history = doc
    out = []
    for q in questions[:turns]:
        prompt = torch.cat([history, q], dim=1)
        clock = _FirstTokenClock()
        t = time.perf_counter()
        with torch.no_grad():
            seq = generate(prompt, attention_mask=torch.ones_like(prompt), streamer=clock,
                           max_new_tokens=answer_tokens, do_sample=False)
        answer = seq[:, prompt.shape[1]:]
        out.append((prompt.shape[1], clock.t_first - t, answer))
        history = torch.cat([prompt, answer], dim=1)
    return out


def _daemon(socket: str | None):
    """(socket, the private DaemonProcess or None, description)."""
    from kvstore.client import KVClient, KVStoreError
    from kvstore.core.paths import default_socket
    from kvstore.testing.daemon import DaemonProcess

    if socket:
        return socket, None, f"kvstore daemon at {socket}"
    try:
        KVClient(default_socket(), timeout_s=1.0, shared_memory=False).close()
        return default_socket(), None, f"running kvstore daemon at {default_socket()}"
    except KVStoreError:
        d = DaemonProcess.private(dram_bytes=256 << 20, chunk_bytes=16 << 20).start()
        return d.socket, d, "private kvstore daemon (started for this demo, 256 MiB DRAM tier)"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.turns < 1 or args.doc_tokens < 1 or args.question_tokens < 1 or args.answer_tokens < 1:
        print("kvstore demo: --turns and the token counts must be positive", file=sys.stderr)
        return 2
    try:
        import torch

        from kvstore.bench.llama import SHAPE_DEMO, SHAPE_TINY, param_count, random_llama
        from kvstore.client.hf import HFPrefixCache
    except ImportError as exc:
        print(f"kvstore demo: needs torch and transformers ({exc}); "
              "pip install 'kvstore-offload[hf]' (in a source checkout: pip install -e '.[hf]')",
              file=sys.stderr)
        return 1
    # A demo should be quick on a busy laptop too: use the cores that are idle now.
    idle = round((os.cpu_count() or 1) - os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
    torch.set_num_threads(args.threads or max(1, min(torch.get_num_threads(), idle)))
    t_start = time.perf_counter()
    shape = SHAPE_DEMO if args.model == "small" else SHAPE_TINY
    model = random_llama(**shape, dtype="float32")
    g = torch.Generator().manual_seed(0)
    vocab = shape["vocab"]
    doc = torch.randint(0, vocab, (1, args.doc_tokens), generator=g)
    questions = [torch.randint(0, vocab, (1, args.question_tokens), generator=g)
                 for _ in range(args.turns)]
    with torch.no_grad():
        model(doc[:, :32])  # first-call costs out of turn 1's timing
    try:
        socket, private, where = _daemon(args.socket)
    except Exception as exc:  # noqa: BLE001
        print(f"kvstore demo: could not start a daemon: {exc}", file=sys.stderr)
        return 1
    try:
        plain = _conversation(model.generate, args.turns, doc, questions, args.answer_tokens)
        with HFPrefixCache(model, "kvstore-demo", socket=socket) as kv:
            reports = []

            def cached_generate(ids, **kw):
                out = kv.generate(ids, **kw)
                reports.append(kv.last)
                kv.flush()  # (not timed) so the next turn sees this turn's blocks
                return out
            cached = _conversation(cached_generate, args.turns, doc, questions,
                                   args.answer_tokens)
            stats = dict(kv.stats)
            hit_rate = kv.hit_rate
    finally:
        if private is not None:
            private.close()
    turns = [{"turn": i + 1, "prompt_tokens": p[0], "cached_tokens": r.reused_tokens,
              "ttft_without_s": p[1], "ttft_with_s": c[1],
              "same_tokens": bool(torch.equal(p[2], c[2])), "fallback": r.fallback}
             for i, (p, c, r) in enumerate(zip(plain, cached, reports))]
    result = {"model": {**shape, "dtype": "float32", "params": param_count(model)},
              "daemon": where, "torch_threads": torch.get_num_threads(), "turns": turns, "hit_rate": hit_rate, "adapter_stats": stats,
              "elapsed_s": time.perf_counter() - t_start}
    print(json.dumps(result, indent=2) if args.json else _render(result))
    return 0


def _render(r: dict) -> str:
    m = r["model"]
    lines = [
        f"kvstore demo: a {len(r['turns'])}-turn chat over a shared document, twice — plain "
        f"transformers, then through kvstore",
        f"model: random-weight Llama, {m['params'] / 1e6:.0f}M parameters ({m['layers']} layers, "
        f"hidden {m['hidden']}, {m['heads']} heads / {m['kv_heads']} kv heads, {m['dtype']}), "
        f"CPU, {r['torch_threads']} torch threads",
        f"daemon: {r['daemon']}",
        "",
        f"{'turn':>4} {'prompt':>7} {'cached':>7} {'TTFT without':>13} {'TTFT with':>10} "
        f"{'speedup':>8}  same tokens",
    ]
    for t in r["turns"]:
        # A turn that reused nothing (the first: there was no cache yet) has no speedup to show;
        # its ratio would only be noise.
        speedup = (f"{t['ttft_without_s'] / t['ttft_with_s']:>7.1f}x" if t["cached_tokens"]
                   else f"{'-':>8}")
        lines.append(
            f"{t['turn']:>4} {t['prompt_tokens']:>7} {t['cached_tokens']:>7} "
            f"{t['ttft_without_s'] * 1e3:>10.0f} ms {t['ttft_with_s'] * 1e3:>7.0f} ms "
            f"{speedup}  "
            f"{'yes' if t['same_tokens'] else 'NO'}{'  (' + t['fallback'] + ')' if t['fallback'] else ''}")
    hits = sum(1 for t in r["turns"] if t["cached_tokens"])
    lines += ["", f"hit rate: {r['hit_rate'] * 100:.0f}% of prompt tokens came from kvstore "
                  f"({hits} of {len(r['turns'])} turns hit); turn 1 stored the document.",
              f"done in {r['elapsed_s']:.1f} s"]
    return "\n".join(lines)
