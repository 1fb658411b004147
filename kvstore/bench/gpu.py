"""`kvstore bench gpu`: the GPU data path against the hardware's own copies, in one run.

* D2H put / H2D get through the SDK (a private daemon, the pinned arena) against one raw
  pinned ``cudaMemcpyAsync`` (torch ``copy_(non_blocking=True)`` of a pinned buffer) of the
  same bytes. Targets: >= 0.8x (goal 0.9x).
* gather / scatter / quantizing gather (Triton) against a device-to-device copy of the same
  bytes. Target: >= 0.7x.

SSD->GPU through kvikio (GDS) is not measured: the GDS path is not built yet. Exits 1 with one
line on a machine without CUDA.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from kvstore.sidecar import PrivateDaemon


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kvstore bench gpu", description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-tokens", type=int, default=16)
    ap.add_argument("--page-tokens", type=int, default=16)
    ap.add_argument("--blocks", type=int, default=64, help="blocks per put/get (and per gather)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--layout", choices=["per_layer", "layer_first"], default="per_layer")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--socket", help="use this running daemon instead of starting a private one")
    ap.add_argument("--json", action="store_true")
    return ap


def _wall(sync, fn, repeat: int, before=None) -> float:
    """Median seconds of fn() from a synchronized start to a synchronized end."""
    times = []
    for i in range(repeat):
        if before:
            before(i)
        sync()
        t0 = time.perf_counter()
        fn(i)
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_transfers(args, torch, device: str = "cuda") -> dict:
    """SDK put/get of ``device`` tensors against a raw copy of the same bytes.

    device="cpu" exercises the same harness (private daemon, keys, checks) without a GPU: that
    is how the tests cover it; its figures are not the GPU figures.
    """
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    from kvstore.client import KVLayout
    layout = KVLayout(args.layers, args.kv_heads, args.head_dim, args.block_tokens, args.dtype)
    n = args.blocks
    nbytes = n * layout.block_bytes
    daemon = None
    if args.socket:
        from kvstore.client import KVClient
        client = KVClient(args.socket, timeout_s=30.0, client_name="kvstore-bench-gpu")
    else:
        chunk = max(64 << 20, -(-layout.slot_bytes // (1 << 20)) * (1 << 20))
        daemon = PrivateDaemon(max(256 << 20, 3 * n * layout.slot_bytes + 2 * chunk), chunk,
                               ["--log-level", "warning"]).start()
    try:
        if daemon:
            from kvstore.client import KVClient
            client = KVClient(daemon.socket, timeout_s=30.0, client_name="kvstore-bench-gpu")
        ns = client.namespace("kvstore-bench-gpu", layout)
        dt = getattr(torch, args.dtype)
        kv = torch.randn(n, *layout.block_shape, device=device).to(dt)
        kv_bytes = kv.view(-1).view(torch.uint8)
        keys_of = [ns.block_keys(list(range(r * 10**6, r * 10**6 + n * args.block_tokens)))
                   for r in range(args.repeat + 1)]

        def put(i):
            assert ns.put(keys_of[i], kv).result() == n

        def drop(i):
            ns.delete(keys_of[i])

        put(args.repeat)                                  # warm-up
        drop(args.repeat)
        if cuda and client._pinned is None:
            print("kvstore bench gpu: warning: the arena is not pinned (see the client log); "
                  "SDK figures are for pageable copies", file=sys.stderr)
        t_put = _wall(sync, put, args.repeat, before=drop)
        ns.put(keys_of[0], kv).result()
        out = torch.empty_like(kv)

        def get(i):
            assert ns.get(keys_of[0], out=out).result().shape[0] == n

        get(0)
        if not torch.equal(out, kv):
            raise RuntimeError("SDK get returned other bytes than were put")
        t_get = _wall(sync, get, args.repeat)
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
        dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
        t_d2h = _wall(sync, lambda i: host.copy_(kv_bytes, non_blocking=True), args.repeat)
        t_h2d = _wall(sync, lambda i: dev.copy_(host, non_blocking=True), args.repeat)
        return {
            "bytes": nbytes, "blocks": n, "block_bytes": layout.block_bytes,
            "arena_pinned": client._pinned is not None,
            "raw_d2h_gbps": nbytes / t_d2h / 1e9, "sdk_put_gbps": nbytes / t_put / 1e9,
            "put_vs_raw": t_d2h / t_put,
            "raw_h2d_gbps": nbytes / t_h2d / 1e9, "sdk_get_gbps": nbytes / t_get / 1e9,
            "get_vs_raw": t_h2d / t_get,
        }
    finally:
        try:
            client.close()
        except NameError:
            pass
        if daemon:
            daemon.stop()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        import torch
    except ImportError:
        print("kvstore bench gpu: needs torch with CUDA; torch is not installed", file=sys.stderr)
        return 1
    if not torch.cuda.is_available():
        why = "this torch is a CPU-only build" if not torch.backends.cuda.is_built() \
            else "no CUDA device is visible"
        print(f"kvstore bench gpu: needs a CUDA device ({why})", file=sys.stderr)
        return 1
    from kvstore.bench import kernels as kbench
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    try:
        res["transfers"] = measure_transfers(args, torch)
        kargs = kbench._parser("").parse_args([
            "--device", "cuda", "--layers", str(args.layers), "--kv-heads", str(args.kv_heads),
            "--head-dim", str(args.head_dim), "--block-tokens", str(args.block_tokens),
            "--page-tokens", str(args.page_tokens), "--blocks", str(args.blocks),
            "--dtype", args.dtype, "--repeat", str(args.repeat), "--layout", args.layout])
        res["kernels"] = kbench.measure(kargs, torch)
    except (RuntimeError, ValueError) as exc:
        print(f"kvstore bench gpu: {exc}", file=sys.stderr)
        return 1
    res["gds"] = "not measured: the GDS (kvikio) path is not built yet"
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    t = res["transfers"]
    print(f"GPU data path on {res['device']} (torch {res['torch']}), "
          f"{t['blocks']} blocks of {t['block_bytes'] / 2**20:.2f} MiB, arena pinned: "
          f"{t['arena_pinned']}")
    print(f"  D2H raw pinned memcpy {t['raw_d2h_gbps']:8.2f} GB/s")
    print(f"  D2H SDK put           {t['sdk_put_gbps']:8.2f} GB/s  = {t['put_vs_raw']:.2f}x raw "
          "(target >= 0.8x)")
    print(f"  H2D raw pinned memcpy {t['raw_h2d_gbps']:8.2f} GB/s")
    print(f"  H2D SDK get           {t['sdk_get_gbps']:8.2f} GB/s  = {t['get_vs_raw']:.2f}x raw "
          "(target >= 0.8x)")
    kbench.report(res["kernels"], "gather/scatter (target >= 0.7x device memcpy)")
    print(f"  SSD->GPU (GDS): {res['gds']}")
    return 0
