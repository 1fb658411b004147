"""`kvstore bench dram`: put/get throughput through the SDK against memcpy of the same bytes.

Workload: ``--blocks`` blocks of ``--block-mib`` (default 2 MiB: 16 tokens of a Llama-3-8B
shard, 2 x 32 layers x 8 heads x 128 dims x 16 tokens x bf16), moved in batches of ``--batch``.
Baselines, measured in the same run on buffers touched before timing, with numpy's copyto
(glibc memcpy, the primitive the SDK uses):
- memcpy per block: one memcpy per 2 MiB block of the batch — what moving blocks costs at least
  on one thread; the primary ratio.
- memcpy per batch: one memcpy of the whole contiguous batch. Reported for transparency: glibc
  switches to a faster large-copy path for copies of ~100 MiB and more, which no block store
  whose blocks live in separate slots can use as such.
"""
from __future__ import annotations

import argparse

from kvstore.bench.harness import best_of, emit, private_daemon


def run(socket: str, n_blocks: int, batch: int, repeats: int, block_layers: int) -> dict:
    import numpy as np
    import torch

    from kvstore.client import KVClient, KVLayout

    layout = KVLayout(num_layers=block_layers, num_kv_heads=8, head_dim=128, block_tokens=16,
                      dtype="bfloat16")
    n_batches = n_blocks // batch
    src = torch.randn(batch, *layout.block_shape).to(torch.bfloat16)
    dst = torch.empty_like(src)
    dst.fill_(1)
    total_bytes = n_batches * batch * layout.block_bytes

    src_np, dst_np = src.view(torch.uint8).numpy(), dst.view(torch.uint8).numpy()

    def memcpy():
        for _ in range(n_batches):
            np.copyto(dst_np, src_np)

    src_rows = src_np.reshape(batch, -1)
    dst_rows = dst_np.reshape(batch, -1)

    def memcpy_blocks():
        for _ in range(n_batches):
            for i in range(batch):
                np.copyto(dst_rows[i], src_rows[i])

    with KVClient(socket, client_name="bench-dram") as client:
        if not client.shared_memory:
            raise SystemExit("bench dram: the daemon's arena is not mappable from here")
        ns = client.namespace("bench-dram", layout)
        key_batches = [ns.block_keys(range(i * batch * 16, (i + 1) * batch * 16))
                       for i in range(n_batches)]

        def puts():
            for keys in key_batches:
                ns.put(keys, src).result()

        def gets():
            for keys in key_batches:
                got = ns.get(keys, out=dst).result()
                assert len(got) == batch, f"only {len(got)} of {batch} blocks came back"

        puts()              # first put populates the index; later puts find the keys stored
        memcpy()            # warm-up
        gets()
        t_get = best_of(gets, repeats)
        t_mem = best_of(memcpy, repeats)
        t_blk = best_of(memcpy_blocks, repeats)
        assert torch.equal(dst, src), "bytes read back differ from bytes written"
        ns.delete([k for ks in key_batches for k in ks])
        t_put = best_of(lambda: (puts(), ns.delete([k for ks in key_batches for k in ks])), 1)

    gbps = lambda t: total_bytes / t / 1e9
    return {
        "block_bytes": layout.block_bytes, "blocks": n_batches * batch, "batch": batch,
        "memcpy_block_gbps": gbps(t_blk), "memcpy_batch_gbps": gbps(t_mem),
        "get_gbps": gbps(t_get), "put_gbps": gbps(t_put),
        "get_ratio": t_blk / t_get, "put_ratio": t_blk / t_put,
        "get_ratio_vs_batch_memcpy": t_mem / t_get, "put_ratio_vs_batch_memcpy": t_mem / t_put,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kvstore bench dram", description=__doc__.splitlines()[0],
                                 allow_abbrev=False)
    ap.add_argument("--blocks", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--layers", type=int, default=32, help="layers per block (32 -> 2 MiB)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--socket", help="use a running daemon instead of starting one")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.blocks < args.batch:
        ap.error("--blocks must be at least --batch")
    block_bytes = args.layers * 2 * 16 * 8 * 128 * 2
    arena = f"{(args.blocks // args.batch * args.batch * block_bytes * 5 // 4) >> 20}MiB"
    if args.socket:
        r = run(args.socket, args.blocks, args.batch, args.repeats, args.layers)
    else:
        with private_daemon("--dram-bytes", arena) as sock:
            r = run(sock, args.blocks, args.batch, args.repeats, args.layers)
    emit(r, args.json, [
        f"DRAM tier, {r['blocks']} blocks of {r['block_bytes'] >> 10} KiB, batches of {r['batch']}",
        f"  memcpy per block (baseline) {r['memcpy_block_gbps']:6.2f} GB/s",
        f"  memcpy per batch            {r['memcpy_batch_gbps']:6.2f} GB/s",
        f"  SDK get                     {r['get_gbps']:6.2f} GB/s   {r['get_ratio']:.2f}x memcpy "
        f"per block, {r['get_ratio_vs_batch_memcpy']:.2f}x per batch",
        f"  SDK put                     {r['put_gbps']:6.2f} GB/s   {r['put_ratio']:.2f}x memcpy "
        f"per block, {r['put_ratio_vs_batch_memcpy']:.2f}x per batch",
    ])
    return 0
