"""`kvstore bench gpu`: the GPU data path against the hardware's own copies, in one run.

* D2H put / H2D get through the SDK (a private daemon, the pinned arena) against one raw
  pinned ``cudaMemcpyAsync`` (torch ``copy_(non_blocking=True)`` of a pinned buffer) of the
  same bytes. Targets: >= 0.8x (goal 0.9x).
* an HBM-tier hit (the daemon's pool opened by CUDA IPC, one device-to-device copy per run of
  blocks) against a raw device-to-device copy of the same bytes.
* gather / scatter / quantizing gather (Triton) against a device-to-device copy of the same
  bytes. Target: >= 0.7x.
* SSD->GPU: kvikio reads (GPUDirect Storage where the driver allows) straight into device
  memory against O_DIRECT reads into pinned host memory plus an H2D copy, of the same file
  (only with the ``gds`` extra installed).

Exits 1 with one line on a machine without CUDA.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from kvstore.testing.daemon import DaemonProcess


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kvstore bench gpu", description=__doc__.splitlines()[0],
                                 allow_abbrev=False)
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
    ap.add_argument("--gds-dir", help="directory on the NVMe drive for the SSD->GPU file "
                    "(default: the system temp dir)")
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
    from kvstore.client import KVClient
    target = args.socket
    if not target:
        chunk = max(64 << 20, -(-layout.slot_bytes // (1 << 20)) * (1 << 20))
        hbm = ["--hbm-bytes", str(2 * n * layout.slot_bytes + 2 * chunk),
               "--hbm-device", "cuda" if cuda else "host"]
        daemon = DaemonProcess.private(max(256 << 20, 3 * n * layout.slot_bytes + 2 * chunk),
                                       chunk, ["--log-level", "warning", *hbm]).start()
        target = daemon.socket
    clients = []
    try:
        # One client reads through DRAM (H2D), one through the HBM pool (when the daemon has one).
        client = KVClient(target, timeout_s=30.0, client_name="kvstore-bench-gpu", use_hbm=False)
        clients.append(client)
        hbm_client = KVClient(target, timeout_s=30.0, client_name="kvstore-bench-gpu-hbm")
        clients.append(hbm_client)
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
        if cuda and client.datapath.pinned is None:
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
        hbm = {}
        if hbm_client.datapath.pool is not None:
            hns = hbm_client.namespace("kvstore-bench-gpu", layout)
            out2 = torch.empty_like(kv)

            def hbm_get(i):
                assert hns.get(keys_of[0], out=out2).result().shape[0] == n

            hbm_get(0)                                     # the DRAM hit that fills HBM
            _wait_hbm_blocks(hbm_client, n)
            hbm_get(0)
            if not torch.equal(out2, kv):
                raise RuntimeError("SDK get from HBM returned other bytes than were put")
            t_hbm = _wall(sync, hbm_get, args.repeat)
            t_d2d = _wall(sync, lambda i: dev.copy_(kv_bytes, non_blocking=True), args.repeat)
            hbm = {"hbm_backend": hbm_client.datapath.pool.backend,
                   "raw_d2d_gbps": nbytes / t_d2d / 1e9, "sdk_hbm_get_gbps": nbytes / t_hbm / 1e9,
                   "hbm_get_vs_d2d": t_d2d / t_hbm, "hbm_get_vs_sdk_dram_get": t_get / t_hbm}
        return {**hbm,
            "bytes": nbytes, "blocks": n, "block_bytes": layout.block_bytes,
            "arena_pinned": client.datapath.pinned is not None,
            "raw_d2h_gbps": nbytes / t_d2h / 1e9, "sdk_put_gbps": nbytes / t_put / 1e9,
            "put_vs_raw": t_d2h / t_put,
            "raw_h2d_gbps": nbytes / t_h2d / 1e9, "sdk_get_gbps": nbytes / t_get / 1e9,
            "get_vs_raw": t_h2d / t_get,
        }
    finally:
        for c in clients:
            c.close()
        if daemon:
            daemon.close()


def _wait_hbm_blocks(client, n: int, timeout_s: float = 10.0) -> None:
    """Wait until the daemon has published n HBM copies (fills are released asynchronously)."""
    from kvstore.v1 import kvstore_pb2 as pb
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(t.tier == pb.TIER_HBM and t.blocks >= n for t in client.stats().tiers):
            return
        time.sleep(0.01)
    raise RuntimeError(f"the HBM tier did not take {n} blocks within {timeout_s:g}s")


def measure_gds(nbytes: int, torch, directory: str | None = None, repeat: int = 5) -> dict | str:
    """SSD->GPU: kvikio into device memory vs O_DIRECT into pinned host memory + H2D copy, of
    the same file (written once, then read ``repeat`` times each way; page cache bypassed on the
    host path). A string saying why when kvikio is missing."""
    import os
    import tempfile

    from kvstore.tiers.ssd import gds
    if not gds.available():
        return "not measured: kvikio is not installed (pip install 'kvstore-offload[gds]')"
    import kvikio
    align = 1 << 20
    nbytes = -(-nbytes // align) * align
    d = tempfile.mkdtemp(prefix="kvstore-bench-gds-", dir=directory)
    path = os.path.join(d, "blocks.bin")
    try:
        src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda")
        with kvikio.CuFile(path, "w") as f:
            f.write(src)
        os.sync()
        dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        sync = torch.cuda.synchronize

        def via_kvikio(i):
            with kvikio.CuFile(path, "r") as f:
                f.read(dev)

        flags = os.O_RDONLY | getattr(os, "O_DIRECT", 0)

        def via_host(i):
            fd = os.open(path, flags)
            try:
                os.preadv(fd, [memoryview(host.numpy())], 0)
            finally:
                os.close(fd)
            dev.copy_(host, non_blocking=True)

        via_kvikio(0)
        if not torch.equal(dev, src):
            raise RuntimeError("kvikio read back other bytes than were written")
        t_k = _wall(sync, via_kvikio, repeat)
        t_h = _wall(sync, via_host, repeat)
        return {"bytes": nbytes, "compat_mode": bool(getattr(kvikio.defaults,
                                                             "is_compat_mode_preferred",
                                                             lambda: None)()),
                "kvikio_gbps": nbytes / t_k / 1e9, "host_bounce_gbps": nbytes / t_h / 1e9,
                "kvikio_vs_host_bounce": t_h / t_k}
    finally:
        import shutil
        shutil.rmtree(d, ignore_errors=True)


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
    try:
        res["gds"] = measure_gds(res["transfers"]["bytes"], torch, args.gds_dir)
    except (RuntimeError, OSError) as exc:
        res["gds"] = f"failed: {exc}"
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
    if "hbm_get_vs_d2d" in t:
        print(f"  D2D raw device copy   {t['raw_d2d_gbps']:8.2f} GB/s")
        print(f"  HBM-tier SDK get      {t['sdk_hbm_get_gbps']:8.2f} GB/s  = "
              f"{t['hbm_get_vs_d2d']:.2f}x raw D2D, {t['hbm_get_vs_sdk_dram_get']:.1f}x the "
              "SDK's DRAM get")
    kbench.report(res["kernels"], "gather/scatter (target >= 0.7x device memcpy)")
    g = res["gds"]
    if isinstance(g, dict):
        print(f"  SSD->GPU kvikio{' (compat mode)' if g['compat_mode'] else ''} "
              f"{g['kvikio_gbps']:6.2f} GB/s vs O_DIRECT->pinned->H2D "
              f"{g['host_bounce_gbps']:6.2f} GB/s = {g['kvikio_vs_host_bounce']:.2f}x")
    else:
        print(f"  SSD->GPU (GDS): {g}")
    return 0
