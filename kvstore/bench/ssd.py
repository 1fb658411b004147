"""`kvstore bench ssd`: the SSD tier through the SDK against raw O_DIRECT I/O of the same disk.

Starts a real daemon with a small DRAM tier and an SSD tier in ``--dir``, then, in one run:

  write   SDK puts (write-through: each commit waits for SSD) of a working set ``--factor``
          times the DRAM tier, against raw O_DIRECT pwrite of the same bytes, same request size
          (one slot) and queue depth (``--qd`` threads = the daemon's SSD I/O threads).
  read    SDK gets of that working set oldest first, so nearly every block is an SSD hit that is
          promoted into DRAM and copied out (bytes checked), against raw O_DIRECT preadv of the
          same slots in random order, same request size and queue depth.
  index   daemon bytes per indexed block after a synthetic fill of ``--index-blocks`` blocks
          (resident memory growth of this process / blocks, and the index arrays alone).

Figures are ratios against the baselines of the same run; absolute numbers depend on the disk.
Beside them, what each pass cost (medians over the pairs): core-seconds of CPU per GB moved, the
daemon's and this process's (the client) apart, and, where ``--dir`` is on a block device, how
busy the disk was and its mean queue depth. Those do not drift with the disk's speed as the
ratios do: a pass that leaves the disk idle part of the time, or that needs the cores a raw
read does not, shows it there.
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Self

import numpy as np

from kvstore.bench.harness import private_daemon_process
from kvstore.core.directio import O_DIRECT, directory_supports_direct_io
from kvstore.core.layout import KVLayout
from kvstore.core.units import format_bytes, parse_size


def _args(argv):
    ap = argparse.ArgumentParser(prog="kvstore bench ssd", description=__doc__.split("\n")[0],
                                 allow_abbrev=False)
    ap.add_argument("--dir", default="/var/tmp", help="where the SSD files go (a real disk)")
    ap.add_argument("--dram", default="128MiB", help="DRAM tier size")
    ap.add_argument("--factor", type=float, default=4.0, help="working set / DRAM tier")
    ap.add_argument("--block-kib", type=int, default=256, help="block size (multiple of 32)")
    ap.add_argument("--batch", type=int, default=32, help="blocks per put/get")
    ap.add_argument("--qd", type=int, default=16, help="queue depth: SSD I/O threads")
    ap.add_argument("--client-threads", type=int, default=8,
                    help="SDK gets/puts in flight (their leases must fit in the DRAM tier)")
    ap.add_argument("--index-blocks", type=int, default=10_000_000,
                    help="synthetic index fill (0: skip)")
    ap.add_argument("--repeat", type=int, default=5,
                    help="raw-read / SDK-get pairs; the median ratio is reported")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    return ap.parse_args(argv)


def _aligned(nbytes: int) -> mmap.mmap:
    return mmap.mmap(-1, nbytes)   # page aligned: what O_DIRECT needs


def raw_io(path: Path, slot: int, n: int, qd: int, write: bool, direct: bool) -> float:
    """Seconds to write (sequential slots) or read (random order) n slots, qd threads, with
    O_DIRECT when ``direct``."""
    flags = os.O_RDWR | (os.O_CREAT if write else 0) | (O_DIRECT if direct else 0)
    fd = os.open(path, flags, 0o600)
    if write:
        os.posix_fallocate(fd, 0, slot * n)
    order = list(range(n))
    if not write:
        random.Random(1).shuffle(order)
    shares = [order[i::qd] for i in range(qd)]

    def worker(share):
        buf = _aligned(slot)
        if write:
            buf.write(os.urandom(slot))
        view = [memoryview(buf)]
        for i in share:
            (os.pwritev if write else os.preadv)(fd, view, i * slot)

    t = time.perf_counter()
    with ThreadPoolExecutor(qd) as ex:
        list(ex.map(worker, shares))
    if write:
        os.fsync(fd)
    dt = time.perf_counter() - t
    os.close(fd)
    return dt


def process_cpu_s(pid: int | None = None) -> float:
    """CPU seconds (user + system, every thread) of process ``pid`` (None: this one), at
    nanosecond resolution (clock ticks would read 0 for a short pass): this process's CPU
    clock, or the sum of another's threads' run times (/proc/PID/task/*/schedstat)."""
    if pid is None:
        return time.process_time()
    total = 0
    for t in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((t / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue            # a thread that ended meanwhile
    return total / 1e9


def disk_stat_path(directory: Path) -> Path | None:
    """/sys/block/<disk>/stat of the block device holding ``directory`` (the whole disk for a
    partition), or None when it is not on one (tmpfs, overlay without a device)."""
    st = os.stat(directory)
    dev = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
    try:
        real = dev.resolve(strict=True)
    except OSError:
        return None
    stat = real / "stat"
    if (real / "partition").exists():
        stat = real.parent / "stat"
    return stat if stat.exists() else None


class Meter:
    """CPU seconds of this process and of the daemon, and the disk's busy and queue time,
    across one pass (``with meter.measure() as m: ...``; then ``m.cpu_per_gb(nbytes)``...)."""

    def __init__(self, daemon_pid: int | None, disk_stat: Path | None):
        self.daemon_pid = daemon_pid
        self.disk_stat = disk_stat

    def _sample(self) -> tuple:
        disk = None
        if self.disk_stat is not None:
            f = self.disk_stat.read_text().split()
            disk = (int(f[9]), int(f[10]))           # io_ticks, time_in_queue (ms)
        dpid = self.daemon_pid
        return (time.perf_counter(), process_cpu_s(),
                process_cpu_s(dpid) if dpid else 0.0, disk)

    def measure(self) -> Pass:
        return Pass(self)


class Pass:
    def __init__(self, meter: Meter):
        self.meter = meter

    def __enter__(self) -> Self:
        self.start = self.meter._sample()
        return self

    def __exit__(self, *exc) -> None:
        self.end = self.meter._sample()

    def figures(self, nbytes: int) -> dict:
        """client/daemon core-seconds per GB, and disk busy fraction / mean queue depth."""
        (t0, c0, d0, k0), (t1, c1, d1, k1) = self.start, self.end
        gb = max(nbytes, 1) / 1e9
        out = {"client_cpu_s_per_gb": (c1 - c0) / gb}
        if self.meter.daemon_pid:
            out["daemon_cpu_s_per_gb"] = (d1 - d0) / gb
        if k0 is not None and t1 > t0:
            # io_ticks advance in whole milliseconds of busy time, counted when a request
            # ends: over a short pass the count can exceed the wall time; busy is at most 1
            out["disk_busy"] = min(1.0, (k1[0] - k0[0]) / 1e3 / (t1 - t0))
            out["disk_queue"] = (k1[1] - k0[1]) / 1e3 / (t1 - t0)
        return out


def _median_figures(passes: list[dict]) -> dict:
    """Each figure's median over the passes that have it."""
    out = {}
    for k in {k for p in passes for k in p}:
        vals = sorted(p[k] for p in passes if k in p)
        out[k] = vals[len(vals) // 2]
    return out


class SDKRun:
    """A daemon with the working set stored through the SDK; get passes on demand."""

    def __init__(self, a, socket: str, layout: KVLayout, n_blocks: int):
        from kvstore.client import KVClient
        self.a, self.layout = a, layout
        self.client = KVClient(socket, io_threads=a.client_threads, client_name="bench-ssd")
        self.short_gets = 0
        self.ns = self.client.namespace("bench-ssd", layout)
        rng = np.random.default_rng(0)
        self.data = rng.integers(0, 256, (a.batch, *layout.block_shape), dtype=np.uint8)
        self.chains = [self.ns.block_keys(rng.integers(0, 50000, a.batch * layout.block_tokens))
                       for _ in range(n_blocks // a.batch)]

    def put_all(self) -> float:
        t = time.perf_counter()
        futs = [self.ns.put(keys, self.data) for keys in self.chains]
        written = sum(f.result() for f in futs)
        dt = time.perf_counter() - t
        if written != len(self.chains) * self.a.batch:
            raise RuntimeError(f"only {written} of {len(self.chains) * self.a.batch} blocks stored")
        return dt

    def get_all(self) -> tuple[float, int]:
        """Get every chain oldest first (each is on SSD only by then: 4x DRAM, LRU), with
        ``client_threads`` gets in flight. Returns (seconds, blocks). The first and last block
        of each get are compared inside the timed loop (a full compare would time numpy, not
        kvstore); tests/tiers/test_ssd.py compares every byte."""
        a, data = self.a, self.data
        outs = [np.empty((a.batch, *self.layout.block_shape), dtype=np.uint8)
                for _ in range(a.client_threads)]
        window: list = []

        def finish(f) -> int:
            r = f.result()
            if len(r) < len(data):
                # Every DRAM slot leased by the gets in flight: the answer is a shorter prefix
                # (the caller would recompute the rest). Counted, not hidden.
                self.short_gets += 1
            if len(r) and not (np.array_equal(r[0], data[0]) and
                               np.array_equal(r[-1], data[len(r) - 1])):
                raise RuntimeError("SDK get returned bytes that differ from the put")
            return len(r)
        got = 0
        t = time.perf_counter()
        for i, keys in enumerate(self.chains):
            if len(window) == len(outs):
                got += finish(window.pop(0))
            window.append(self.ns.get(keys, out=outs[i % len(outs)]))
        got += sum(finish(f) for f in window)
        return time.perf_counter() - t, got

    def acquire_all(self) -> tuple[float, int]:
        """Like get_all, through zero-copy leases (acquire -> read the arena in place ->
        release): what a consumer that DMAs straight from the arena pays."""
        from concurrent.futures import ThreadPoolExecutor
        data = self.data

        def one(keys) -> int:
            with self.ns.acquire(keys) as lease:
                views = lease.views(like="numpy")
                n = len(views)
                if n and not (np.array_equal(views[0], data[0].reshape(-1)) and
                              np.array_equal(views[-1], data[n - 1].reshape(-1))):
                    raise RuntimeError("leased bytes differ from the put")
            if n < len(data):
                self.short_gets += 1
            return n
        t = time.perf_counter()
        with ThreadPoolExecutor(self.a.client_threads) as ex:
            got = sum(ex.map(one, self.chains))
        return time.perf_counter() - t, got

    def ssd_stats(self):
        from kvstore.v1 import kvstore_pb2 as pb
        return {t.tier: t for t in self.client.stats().tiers}[pb.TIER_SSD]

    def close(self) -> None:
        self.client.close()


def index_bytes_per_block(n: int) -> dict:
    from kvstore.store.table import BlockTable

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    rng = np.random.default_rng(0)
    base = rss()
    idx = BlockTable()
    t = time.perf_counter()
    step = 100_000
    for i in range(0, n, step):
        m = min(step, n - i)
        keys = rng.integers(0, 2**63, (m, 2), dtype=np.uint64)
        # chains of 64 blocks: each block's parent is the previous one of its chain
        bids = idx.add_many(i // step % 8, keys.tobytes(), np.full(m, -1), 1)
        idx.publish(bids)
    fill_s = time.perf_counter() - t
    probe = keys[:4096].tobytes()
    t = time.perf_counter()
    found = idx.find_many((n - 1) // step % 8, probe)
    find_ms = (time.perf_counter() - t) * 1e3
    assert (found >= 0).all()
    return {"blocks": n, "rss_bytes_per_block": (rss() - base) / n,
            "array_bytes_per_block": idx.nbytes() / n, "fill_s": fill_s,
            "find_4096_ms": find_ms}


def main(argv: list[str]) -> int:
    a = _args(argv)
    if a.block_kib % 32:
        print("kvstore bench ssd: --block-kib must be a multiple of 32", file=sys.stderr)
        return 2
    layout = KVLayout(num_layers=a.block_kib // 32, num_kv_heads=8, head_dim=128,
                      block_tokens=16, dtype="uint8")
    dram = parse_size(a.dram)
    n_blocks = int(dram * a.factor) // layout.slot_bytes // a.batch * a.batch
    work = Path(tempfile.mkdtemp(prefix="kvstore-bench-ssd-", dir=a.dir))
    res: dict = {"block_bytes": layout.block_bytes, "request_bytes": layout.slot_bytes,
                 "queue_depth": a.qd, "working_set_bytes": n_blocks * layout.slot_bytes,
                 "dram_bytes": dram, "dir": str(work)}
    try:
        res["o_direct"] = direct = directory_supports_direct_io(work)
        raw = work / "raw.bin"
        slot = layout.slot_bytes
        cost: dict = {}
        with Meter(None, disk_stat_path(work)).measure() as m:
            raw_w = raw_io(raw, slot, n_blocks, a.qd, write=True, direct=direct)
        cost["raw_write"] = m.figures(n_blocks * slot)
        seg = 64 << 20
        ssd_bytes = -(-int(n_blocks * slot * 1.25) // seg) * seg
        with private_daemon_process("--dram-bytes", a.dram, "--chunk-bytes", "4MiB",
                            "--ssd-dir", str(work / "ssd"), "--ssd-bytes", str(ssd_bytes),
                            "--ssd-segment-bytes", str(seg), "--ssd-io-threads", str(a.qd),
                            # One client with --client-threads gets in flight: the default
                            # per-client limit (half of DRAM) refused a window of 8 x 8 MiB
                            # now and then (RESOURCE_EXHAUSTED, OVER_LIMIT)
                            "--max-inflight-bytes-per-client", a.dram,
                            "--log-level", "warning") as d:
            meter = Meter(d.proc.pid, disk_stat_path(work))
            raw_meter = Meter(None, meter.disk_stat)    # the raw passes run in this process
            sdk = SDKRun(a, d.socket, layout, n_blocks)
            try:
                with meter.measure() as m:
                    put_s = sdk.put_all()
                cost["sdk_put"] = m.figures(n_blocks * layout.block_bytes)
                pairs, raw_cost, get_cost = [], [], []
                for _ in range(a.repeat):   # alternate baseline and SDK: load noise hits both
                    with raw_meter.measure() as m:
                        raw_r = raw_io(raw, slot, n_blocks, a.qd, write=False, direct=direct)
                    raw_cost.append(m.figures(n_blocks * slot))
                    with meter.measure() as m:
                        get_s, got = sdk.get_all()
                    get_cost.append(m.figures(got * layout.block_bytes))
                    acq_s, acq = sdk.acquire_all()
                    pairs.append((n_blocks * slot / raw_r, got * layout.block_bytes / get_s,
                                  acq * layout.block_bytes / acq_s))
                cost["raw_read"] = _median_figures(raw_cost)
                cost["sdk_get"] = _median_figures(get_cost)
                st = sdk.ssd_stats()
            finally:
                sdk.close()
        raw.unlink()
        ratios = sorted(g / r for r, g, _ in pairs)
        med = pairs[[g / r for r, g, _ in pairs].index(ratios[len(ratios) // 2])]
        acq_ratios = sorted(q / r for r, _, q in pairs)
        res.update({
            "raw_write_bps": n_blocks * slot / raw_w,
            "sdk_put_bps": n_blocks * layout.block_bytes / put_s,
            "raw_read_bps": med[0], "sdk_get_bps": med[1],
            "get_vs_raw_read": med[1] / med[0], "get_vs_raw_read_all": ratios,
            "acquire_vs_raw_read": acq_ratios[len(acq_ratios) // 2],
            "acquire_vs_raw_read_all": acq_ratios,
            "ssd_hits": st.hits, "ssd_promotions": st.promotions, "ssd_io": st.backend,
            "checksum_failures": st.checksum_failures,
            "sdk_get_blocks": 2 * n_blocks * a.repeat,   # get + acquire passes
            "short_gets": sdk.short_gets,
        })
        res["put_vs_raw_write"] = res["sdk_put_bps"] / res["raw_write_bps"]
        res["cost"] = cost
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if a.index_blocks:
        res["index"] = index_bytes_per_block(a.index_blocks)
    if a.json:
        print(json.dumps(res, indent=2))
        return 0
    gb = lambda bps: f"{bps / 1e9:.2f} GB/s"  # noqa: E731
    print(f"SSD tier bench: working set {format_bytes(res['working_set_bytes'])} = "
          f"{a.factor:g}x DRAM {format_bytes(dram)}, request {format_bytes(layout.slot_bytes)}, "
          f"queue depth {a.qd}, {'O_DIRECT' if res['o_direct'] else 'buffered (no O_DIRECT)'}, "
          f"daemon I/O through {res['ssd_io']}")
    print(f"  get      SDK {gb(res['sdk_get_bps'])}  raw read  {gb(res['raw_read_bps'])}  "
          f"ratio {res['get_vs_raw_read']:.2f}x  (median of {a.repeat} alternating pairs: "
          f"{', '.join(f'{r:.2f}' for r in res['get_vs_raw_read_all'])}; {res['ssd_hits']} SSD "
          f"hits for {res['sdk_get_blocks']} blocks asked, {res['short_gets']} gets answered "
          f"a shorter prefix)")
    print(f"  acquire (zero-copy lease) / raw read: median {res['acquire_vs_raw_read']:.2f}x "
          f"({', '.join(f'{r:.2f}' for r in res['acquire_vs_raw_read_all'])})")
    print(f"  put  SDK {gb(res['sdk_put_bps'])}  raw write {gb(res['raw_write_bps'])}  "
          f"ratio {res['put_vs_raw_write']:.2f}x  (write-through: commit waits for SSD + fsync)")
    for name, label in (("raw_read", "raw reads"), ("sdk_get", "SDK gets"),
                        ("raw_write", "raw writes"), ("sdk_put", "SDK puts")):
        c = res["cost"].get(name, {})
        line = f"  cost of {label:<10}  CPU per GB: client {c.get('client_cpu_s_per_gb', 0):.2f}"
        if name.startswith("sdk"):
            line += f" + daemon {c.get('daemon_cpu_s_per_gb', 0):.2f}"
        line += " core-s"
        if "disk_busy" in c:
            line += f"; disk busy {100 * c['disk_busy']:.0f}%, mean queue {c['disk_queue']:.1f}"
        print(line)
    if "index" in res:
        ix = res["index"]
        print(f"  index: {ix['blocks']:,} blocks, {ix['rss_bytes_per_block']:.1f} B/block "
              f"resident ({ix['array_bytes_per_block']:.1f} B in the index arrays), "
              f"find of 4096 keys {ix['find_4096_ms']:.2f} ms")
    return 0
