"""`kvstore bench kernels`: paged-KV gather/scatter against a plain copy of the same bytes.

The baseline is ``dst.copy_(src)`` of one contiguous buffer as large as the blocks moved, on the
same device, in the same run; the figure that matters is the ratio (1.0 = the kernel moves bytes
as fast as a flat copy). On CPU this measures the torch reference; on CUDA the Triton kernels.
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def _parser(prog: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-tokens", type=int, default=16)
    ap.add_argument("--page-tokens", type=int, default=16)
    ap.add_argument("--blocks", type=int, default=32, help="blocks moved per call")
    ap.add_argument("--pages", type=int, default=0, help="pages in the cache (default 4x needed)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--layout", choices=["per_layer", "layer_first"], default="per_layer",
                    help="a list of per-layer caches (vLLM) or one layer-first tensor")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--json", action="store_true")
    return ap


def timer(device):
    """run(fns, repeat) -> the best seconds of each fn, the fns interleaved round by round.

    Interleaving exposes the kernels and the baseline to the same interference (other jobs on a
    shared machine), and the best of several rounds is the least disturbed one.
    """
    import torch
    cuda = device.type == "cuda"

    def once(fn) -> float:
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            return a.elapsed_time(b) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def run(fns, repeat):
        best = [float("inf")] * len(fns)
        for _ in range(repeat):
            for k, fn in enumerate(fns):
                best[k] = min(best[k], once(fn))
        return best
    return run


def measure(args, torch) -> dict:
    from kvstore.kernels import gather, gather_quantized, scatter
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.block_tokens % args.page_tokens:
        raise ValueError("--page-tokens must divide --block-tokens")
    ppb = args.block_tokens // args.page_tokens
    pages = args.pages or 4 * args.blocks * ppb
    g = torch.Generator().manual_seed(0)
    cache = [torch.randn(2, pages, args.page_tokens, args.kv_heads, args.head_dim,
                         generator=g).to(dtype).to(dev) for _ in range(args.layers)]
    if args.layout == "layer_first":
        cache = torch.stack(cache)
    pt = torch.randperm(pages, generator=g)[: args.blocks * ppb].reshape(args.blocks, ppb)
    out = gather(cache, pt)                                   # warms up (and compiles triton)
    scatter(cache, pt, out)
    nbytes = out.numel() * out.element_size()
    flat_src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    flat_dst = torch.empty_like(flat_src)
    run = timer(dev)
    fns = [lambda: flat_dst.copy_(flat_src), lambda: gather(cache, pt, out=out),
           lambda: scatter(cache, pt, out)]
    quantizable = dtype.is_floating_point and dtype.itemsize >= 2
    if quantizable:
        gather_quantized(cache, pt, "int8")
        fns.append(lambda: gather_quantized(cache, pt, "int8"))
    times = run(fns, args.repeat)
    base, t_gather, t_scatter = times[:3]
    res = {
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "impl": "triton" if dev.type == "cuda" else "torch reference",
        "bytes_per_call": nbytes, "blocks": args.blocks, "layers": args.layers,
        "layout": args.layout, "page_tokens": args.page_tokens,
        "block_tokens": args.block_tokens, "dtype": args.dtype,
        "copy_gbps": nbytes / base / 1e9,
        "gather_gbps": nbytes / t_gather / 1e9, "scatter_gbps": nbytes / t_scatter / 1e9,
        "gather_vs_copy": base / t_gather, "scatter_vs_copy": base / t_scatter,
    }
    if quantizable:
        t_q = times[3]
        res["gather_int8_gbps"] = nbytes / t_q / 1e9            # source bytes read per second
        res["gather_int8_vs_copy"] = base / t_q
    return res


def report(res: dict, title: str) -> None:
    print(f"{title} on {res['device']} ({res['impl']}): {res['blocks']} blocks x "
          f"{res['layers']} layers ({res['layout']}), pages of {res['page_tokens']} -> blocks of "
          f"{res['block_tokens']} tokens, {res['dtype']}, {res['bytes_per_call'] / 2**20:.1f} MiB "
          "per call")
    print(f"  plain copy (baseline) {res['copy_gbps']:8.2f} GB/s")
    for k in ("gather", "scatter", "gather_int8"):
        if f"{k}_gbps" in res:
            print(f"  {k:<21} {res[f'{k}_gbps']:8.2f} GB/s  = {res[f'{k}_vs_copy']:.2f}x copy")


def main(argv: list[str] | None = None) -> int:
    args = _parser("kvstore bench kernels").parse_args(argv)
    import torch
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("kvstore bench kernels: --device cuda needs a CUDA device; none is visible",
              file=sys.stderr)
        return 1
    try:
        res = measure(args, torch)
    except (ValueError, RuntimeError) as exc:
        print(f"kvstore bench kernels: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        report(res, "gather/scatter")
    return 0
