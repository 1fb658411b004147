"""kvstore bench cluster — the cluster tier against the engine's own client, same run.

Starts a real engine (a Mooncake master, or a 3-master Redis Cluster) on free loopback ports and
two daemons, "host A" and "host B", both with ``--remote`` pointing at it, then measures:

  get    host B's SDK get of blocks host A stored (B's local tiers hold none of them: each rep
         deletes B's local copies first), through the remote tier — existence check, verified
         read into B's arena, the client's copy out — against the engine's own client reading
         the same values in one batch (Mooncake batch_get_into into registered memory, Redis a
         pipeline of GETs): get_vs_raw_client = raw time / SDK time.
  acquire the same read through the SDK's zero-copy path (acquire: the values land verified in
         B's arena slots, read in place, then released): what the raw client does, reading
         into its registered memory, plus verification: acquire_vs_raw_client. The get is
         that plus the client's copy out of the arena.
  put    host A's SDK put until the background writer has stored the blocks remotely, against
         the raw client storing as many values of the same size: put_vs_raw_client.
  ttft   a random-weight Llama (default the ~1B shape) computes a --ttft-tokens prefix on host A
         (full prefill, timed), stores it; host B, whose tiers are empty, generates from the same
         prompt reusing it through the remote tier: ttft_speedup = full prefill / B's TTFT.

Floors (issue 14): get_vs_raw_client >= 0.7 (goal 0.9), ttft_speedup >= 10.
On a 2-core CPU the 1B 2048-token prefill takes tens of seconds; --shape demo or --no-ttft
for a quick run.
"""
from __future__ import annotations

import argparse
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from kvstore.bench.harness import emit

FLOORS = {"get_vs_raw_client": 0.7, "ttft_speedup": 10.0}
GOALS = {"get_vs_raw_client": 0.9}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kvstore bench cluster", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:]), allow_abbrev=False)
    ap.add_argument("--backend", choices=["mooncake", "redis"], default="mooncake")
    ap.add_argument("--blocks", type=int, default=32, help="blocks per batch (default 32)")
    ap.add_argument("--block-tokens", type=int, default=64,
                    help="tokens per block of the get/put layout: 16 layers x 8 kv heads x 64 "
                         "dims fp16, so 64 tokens = 2 MiB blocks (default)")
    ap.add_argument("--reps", type=int, default=6,
                    help="runs per point (median; 6 = each reader first twice)")
    ap.add_argument("--ttft-tokens", type=int, default=2048)
    ap.add_argument("--shape", choices=["1b", "demo"], default="1b")
    ap.add_argument("--no-ttft", action="store_true", help="skip the TTFT point")
    ap.add_argument("--threads", type=int, help="torch intra-op threads")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from kvstore.bench.cluster_engines import skip_reason
    reason = skip_reason(args.backend)
    if reason:
        print(f"kvstore bench cluster: {reason}", file=sys.stderr)
        return 2
    # `timeout` and CI runners stop a long run with SIGTERM: unwind through run()'s cleanup so
    # the engine and both daemons do not outlive it (orphans holding GBs of arena and segment).
    signal.signal(signal.SIGTERM, _terminated)
    result = run(args)
    emit(result, args.json, render(result))
    return 0


def _terminated(signum, frame):
    raise SystemExit(128 + signum)


def _median(xs) -> float:
    return statistics.median(list(xs))


def run(args) -> dict:
    from kvstore.bench.cluster_engines import RawClient, start_engine
    from kvstore.client import KVClient
    from kvstore.core.layout import KVLayout
    from kvstore.testing.daemon import DaemonProcess
    from kvstore.tiers.remote.codec import HEADER_BYTES, remote_key

    layout = KVLayout(num_layers=16, num_kv_heads=8, head_dim=64,
                      block_tokens=args.block_tokens, dtype="float16")
    bb, n = layout.block_bytes, args.blocks
    batch_bytes = n * bb
    # A and B lend the pool room for every rep's blocks (SDK and raw), twice over.
    pool = 2 * (2 * args.reps + 4) * batch_bytes + (256 << 20)
    workdir = Path(tempfile.mkdtemp(prefix="kvstore-bench-cluster-"))
    engine = start_engine(args.backend, workdir / "engine")
    daemons: list[DaemonProcess] = []
    raw = None
    result: dict = {"backend": args.backend, "block_bytes": bb, "blocks": n,
                    "reps": args.reps, "floors": FLOORS, "goals": GOALS}
    try:
        dram = -(-(4 * batch_bytes + (256 << 20)) // (64 << 20)) * (64 << 20)
        for _ in range(2):
            daemons.append(DaemonProcess.private(dram_bytes=dram, extra_args=[
                "--remote", engine.url, "--remote-segment-bytes", str(pool // 2),
                "--remote-read-deadline-s", "30", "--remote-deadline-s", "5",
                "--remote-queue-blocks", str(max(4 * n + 64, 4096)),
                "--max-inflight-bytes-per-client", str(dram)]).start())
        a, b = daemons
        raw = RawClient(engine.url)
        with KVClient(a.socket) as ca, KVClient(b.socket) as cb:
            nsa = ca.namespace("bench-cluster", layout)
            nsb = cb.namespace("bench-cluster", layout)
            rng = np.random.default_rng(0)
            data = (rng.integers(0, 256, (n, bb), dtype=np.uint8).view(np.float16)
                    .reshape(n, *layout.block_shape))

            # -- put: SDK (until stored remotely) vs raw client ----------------------------------
            sdk_put, raw_put, key_sets = [], [], []
            rawbuf = np.zeros(n * (HEADER_BYTES + bb), dtype=np.uint8)
            rawbuf.reshape(n, -1)[:, HEADER_BYTES:] = data.view(np.uint8).reshape(n, -1)
            raw.register(rawbuf)
            for rep in range(args.reps + 1):
                keys = nsa.block_keys(np.arange(n * layout.block_tokens) + rep * 10**6)
                t0 = time.perf_counter()
                assert nsa.put(keys, data).result(timeout=120) == n
                # until readable from the cluster tier: the writer's queue emptying is not that
                # (a batch leaves the queue before it is sent)
                placed = nsa.flush_remote(keys, 120.0).result(timeout=180)
                if not placed.complete:
                    raise RuntimeError(f"host A's blocks did not reach the cluster tier: "
                                       f"{placed.num_placed} of {n} in 120 s")
                sdk_put.append(time.perf_counter() - t0)
                key_sets.append(keys)
                rkeys = [f"bench-raw/{rep}/{i}" for i in range(n)]
                t0 = time.perf_counter()
                raw.put_many(rkeys, rawbuf, HEADER_BYTES + bb)
                raw_put.append(time.perf_counter() - t0)
            del sdk_put[0], raw_put[0]      # the warm-up (first connections to the segments)

            # -- get: host B's SDK get (empty local tiers) vs raw client, same values ------------
            # Three readers of the same values per rep: the raw client (batch_get_into its
            # registered buffer), the SDK's zero-copy read (acquire: the daemon reads the values
            # into arena slots, verifies them, leases them; the caller reads the slots in place,
            # then releases), and the SDK get (the same, plus the copy into the caller's array).
            sdk_get, sdk_acq, raw_get, local_get, lookup_s = [], [], [], [], []
            out = np.empty_like(data)
            hits0 = next(t.hits for t in cb.stats().tiers if t.tier == 4)

            def raw_read(rkeys):
                t0 = time.perf_counter()
                raw.get_many_into(rkeys, rawbuf, HEADER_BYTES + bb)
                raw_get.append(time.perf_counter() - t0)

            def sdk_get_once(keys):
                nsb.delete(keys)    # B's local copies (from an earlier read) go; remote stays
                t0 = time.perf_counter()
                assert nsb.lookup(keys).num_cached == n
                lookup_s.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                got = nsb.get(keys, out=out).result(timeout=120)
                sdk_get.append(time.perf_counter() - t0)
                if len(got) != n or not np.array_equal(out.view(np.uint8), data.view(np.uint8)):
                    raise RuntimeError(f"host B got {len(got)}/{n} blocks or wrong bytes")
                t0 = time.perf_counter()
                nsb.get(keys, out=out).result(timeout=120)   # now local: the DRAM part of it
                local_get.append(time.perf_counter() - t0)

            def sdk_acquire_once(keys):
                nsb.delete(keys)
                assert nsb.lookup(keys).num_cached == n
                t0 = time.perf_counter()
                lease = nsb.acquire(keys)
                views = lease.views(like="numpy") if len(lease) == n else []
                t1 = time.perf_counter()
                ok = len(views) == n and all(
                    np.array_equal(v, data[i].view(np.uint8).reshape(-1))
                    for i, v in enumerate(views))
                t2 = time.perf_counter()
                lease.release()
                sdk_acq.append(t1 - t0 + time.perf_counter() - t2)
                if not ok:
                    raise RuntimeError(f"host B acquired {len(lease)}/{n} blocks or wrong bytes")

            # Rep 0 warms up both readers (B's transfer engine opens its connections to the
            # segments holding the values on its first read; the raw client did on its puts)
            # and is not counted.
            for rep in range(args.reps + 1):
                keys = key_sets[rep]
                rkeys = [remote_key(nsb.namespace_id, k) for k in keys]
                steps = [lambda: raw_read(rkeys), lambda: sdk_get_once(keys),
                         lambda: sdk_acquire_once(keys)]
                # The box's load drifts: rotate which reader goes first, so none always meets
                # the same moment (and the same warm caches).
                for step in steps[rep % 3:] + steps[:rep % 3]:
                    step()
                if rep == 0:
                    for times in (raw_get, sdk_get, sdk_acq, local_get, lookup_s):
                        times.clear()
            hits = next(t.hits for t in cb.stats().tiers if t.tier == 4) - hits0
            result.update({
                "sdk_get_s": _median(sdk_get), "raw_get_s": _median(raw_get),
                "sdk_acquire_s": _median(sdk_acq),
                "sdk_put_s": _median(sdk_put), "raw_put_s": _median(raw_put),
                "sdk_get_bps": batch_bytes / _median(sdk_get),
                "sdk_acquire_bps": batch_bytes / _median(sdk_acq),
                "raw_get_bps": batch_bytes / _median(raw_get),
                "sdk_put_bps": batch_bytes / _median(sdk_put),
                "raw_put_bps": batch_bytes / _median(raw_put),
                "remote_hits_on_b": hits, "sdk_get_local_s": _median(local_get),
                "remote_lookup_s": _median(lookup_s),
            })
            # Ratios of the same rep's readers (back to back, so under the same load), then the
            # median over reps: the box's load drifts more between reps than within one.
            result["acquire_vs_raw_client"] = _median(r / s for r, s in zip(raw_get, sdk_acq))
            result["get_vs_raw_client"] = _median(r / s for r, s in zip(raw_get, sdk_get))
            result["put_vs_raw_client"] = _median(raw_put) / _median(sdk_put)
        # progress on stderr: a TTFT point on a slow box can take many minutes
        if not args.no_ttft:
            print("\n".join(render(result)), file=sys.stderr, flush=True)
            result["ttft"] = _ttft(args, a.socket, b.socket)
            result["ttft_speedup"] = result["ttft"]["speedup"]
    finally:
        if raw is not None:
            raw.close()
        for d in daemons:
            d.close()
        engine.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def _ttft(args, socket_a: str, socket_b: str) -> dict:
    import torch
    from transformers import DynamicCache

    from kvstore.bench.llama import SHAPE_1B, SHAPE_DEMO, param_count, random_llama
    from kvstore.client import KVClient
    from kvstore.client.hf import HFPrefixCache

    if args.threads:
        torch.set_num_threads(args.threads)
    shape = SHAPE_1B if args.shape == "1b" else SHAPE_DEMO
    size = args.ttft_tokens
    model = random_llama(**shape, max_positions=size + 64)
    with torch.no_grad():
        model(torch.zeros((1, 32), dtype=torch.long))
    ids = torch.randint(0, model.config.vocab_size, (1, size),
                        generator=torch.Generator().manual_seed(size))
    mask = torch.ones_like(ids)
    gen = dict(max_new_tokens=1, do_sample=False)
    model_id = f"bench-cluster-ttft-{args.shape}"
    with HFPrefixCache(model, model_id, socket=socket_a, deadline_s=120.0) as kva, \
            KVClient(socket_a) as ca:
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            t0 = time.perf_counter()
            full_out = model.generate(ids, attention_mask=mask, past_key_values=cache, **gen)
            full_s = time.perf_counter() - t0
        print(f"  ttft: full prefill of {size} tokens on A {full_s:.2f} s", file=sys.stderr,
              flush=True)
        stored = kva.store(ids, cache).result()
        want = stored * kva.layout.block_bytes
        # B must find every block A computed: wait until they are readable from the cluster
        nsa = ca.namespace(kva.model_id, kva.layout, kva.tenant)   # the cache's (fingerprinted)
        keys = nsa.block_keys(ids[0].tolist())
        placed = nsa.flush_remote(keys, 120.0).result(timeout=180)
        if not placed.complete:
            row = next(t for t in ca.stats().tiers if t.tier == 4)
            raise RuntimeError(f"host A's blocks did not reach the cluster tier: "
                               f"{placed.num_placed} of {len(keys)} in 120 s ({row})")
    with HFPrefixCache(model, model_id, socket=socket_b, deadline_s=120.0) as kvb:
        with torch.no_grad():
            t0 = time.perf_counter()
            out = kvb.generate(ids, attention_mask=mask, **gen)
            reuse_s = time.perf_counter() - t0
        last = kvb.last
        if last.fallback or last.reused_tokens != size - kvb.layout.block_tokens:
            raise RuntimeError(f"host B did not reuse the prefix: {last}")
        tiers = sorted(set(last.tiers))
    return {"model": {**shape, "params": param_count(model)}, "prompt_tokens": size,
            "reused_tokens": last.reused_tokens, "full_prefill_s": full_s,
            "host_b_reuse_s": reuse_s, "tiers": tiers, "bytes": want,
            "same_first_token": int(out[0, -1]) == int(full_out[0, -1]),
            "speedup": full_s / reuse_s}


def render(r: dict) -> list[str]:
    mb = 1e6
    lines = [f"kvstore bench cluster: {r['backend']}, {r['blocks']} blocks of "
             f"{r['block_bytes'] >> 10} KiB per batch, median of {r['reps']}",
             f"  get  host B SDK (remote -> arena -> client) {r['sdk_get_bps'] / mb:8.0f} MB/s   "
             f"raw client {r['raw_get_bps'] / mb:8.0f} MB/s   get_vs_raw_client "
             f"{r['get_vs_raw_client']:.2f} (floor {FLOORS['get_vs_raw_client']}; the same get "
             f"from B's DRAM afterwards {r['sdk_get_local_s'] * 1e3:.0f} ms of "
             f"{r['sdk_get_s'] * 1e3:.0f})",
             f"  acq  host B SDK zero-copy (remote -> arena)  {r['sdk_acquire_bps'] / mb:8.0f} MB/s   "
             f"raw client {r['raw_get_bps'] / mb:8.0f} MB/s   acquire_vs_raw_client "
             f"{r['acquire_vs_raw_client']:.2f}",
             f"  put  host A SDK (until stored remotely)     {r['sdk_put_bps'] / mb:8.0f} MB/s   "
             f"raw client {r['raw_put_bps'] / mb:8.0f} MB/s   put_vs_raw_client "
             f"{r['put_vs_raw_client']:.2f}"]
    t = r.get("ttft")
    if t:
        lines.append(f"  ttft {t['prompt_tokens']} tokens ({t['model']['params'] / 1e9:.2f}B "
                     f"params): full prefill on A {t['full_prefill_s']:.2f} s, reuse on B "
                     f"{t['host_b_reuse_s']:.3f} s (tiers {','.join(t['tiers'])}, same first "
                     f"token: {t['same_first_token']})   ttft_speedup {t['speedup']:.1f}x "
                     f"(floor {FLOORS['ttft_speedup']:g})")
    return lines
