"""`kvstore bench startup`: how soon a new daemon answers, and how soon its whole DRAM arena is
usable, against `fallocate` of the same size in the same directory (measured in the same run).

For each size: the baseline reserves a file of that size with posix_fallocate (what the arena's
memory costs the kernel, and the floor for "full capacity"), then a real `kvstore serve` starts
with that --dram-bytes and is polled over its socket:

- ready_s: spawn → the first GetStats answered (the daemon serves from here on);
- full_s: spawn → DRAM ready_bytes == capacity_bytes (every chunk reserved and allocatable);
- populated_s: spawn → the daemon's log says every page is populated (fast first copies);
- reserve_s: the daemon's own figure for reserving the whole arena in the background, from the
  start of its preparation (full_s less the process's start-up).

full_vs_fallocate = full_s / fallocate_s (goal ≤ 1.2; at small sizes the process start-up alone
exceeds it), reserve_vs_fallocate = reserve_s / fallocate_s (what background preparation costs
over the bare system call); max_ready_s is the slowest ready_s over the sizes (goal ≤ 1.5 s).

The restart case (--ssd-blocks N, e.g. 1000000; off by default): a daemon with a small arena
restarted on a synthetic SSD directory of that many journaled 4 KiB blocks (make_ssd_dir; a
sample of them holds real bytes): restart_ready_s = spawn → first GetStats answered,
restart_ssd_loaded_s = spawn → SSD ready_bytes == capacity (the index loaded); two rounds of DRAM
put, get and lookup are made as soon as it answers (dram_during_load: both rounds answered before the load ended; dram_ops_s: the second),
and every sampled SSD block is read back and compared after it.
ready_vs_tiny = ready_s / the ready_s of a daemon with a tiny arena (--tiny-size, started just
before, after the baseline): the part of the start-up that grows with the arena (1.0: none), which a loaded
machine's slow Python start-up does not blur. A size that does not fit in the directory's free
space or in the host's available memory is skipped with that reason, not measured half-way.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kvstore.core.arena import HEADER_BYTES, default_shm_dir
from kvstore.bench.harness import emit
from kvstore.core.units import format_bytes, parse_size

POLL_S = 0.01
_POPULATED = re.compile(r"DRAM arena prepared: .* pages populated by ([0-9.]+)s")
_RESERVED = re.compile(r"DRAM arena: full capacity \([^)]*\) reserved in ([0-9.]+)s")


def available_memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def fits(size_bytes: int, directory: Path) -> str:
    """Empty when ``size_bytes`` (plus headroom) fits in the directory and in memory, else why."""
    need = size_bytes + HEADER_BYTES + (256 << 20)
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    if free < need:
        return f"{directory} has {format_bytes(free)} free, needs {format_bytes(need)}"
    mem = available_memory_bytes()
    if mem is not None and mem < need:
        return f"the host has {format_bytes(mem)} of memory available, needs {format_bytes(need)}"
    return ""


def time_fallocate(size_bytes: int, directory: Path) -> float:
    fd, path = tempfile.mkstemp(prefix="kvstore-bench-fallocate-", dir=directory)
    try:
        t0 = time.perf_counter()
        os.posix_fallocate(fd, 0, size_bytes + HEADER_BYTES)
        return time.perf_counter() - t0
    finally:
        os.close(fd)
        os.unlink(path)


# The restart case: a synthetic SSD directory of n blocks of 4 KiB (one namespace, chains of
# RESTART_CHAIN), built in process with the tier's own file and journal code. Only a sample of
# the slots holds real bytes (written and checksummed like a daemon's); the rest are journaled
# only (their reads would fail the checksum: a miss, never served), which is all recovery reads.
RESTART_LAYOUT = dict(num_layers=1, num_kv_heads=1, head_dim=128, block_tokens=16, dtype="uint8")
RESTART_MODEL = "bench-restart"
RESTART_CHAIN = 64
RESTART_SEGMENT_BYTES = 256 << 20


def make_ssd_dir(ssd_dir: Path, n_blocks: int, sample: int = 64, seed: int = 0):
    """Build an SSD directory holding ``n_blocks`` journaled blocks; returns (ssd_bytes, keys,
    data) of ``sample`` blocks whose bytes are really in their slots (keys: 16-byte each)."""
    import numpy as np

    from kvstore.core.keys import namespace_digest
    from kvstore.core.layout import KVLayout
    from kvstore.tiers.ssd import journal as jr
    from kvstore.tiers.ssd.files import SlabFiles
    from kvstore.tiers.ssd.format import SLOT_BITS, slots_per_segment

    layout = KVLayout(**RESTART_LAYOUT)
    per_seg = slots_per_segment(RESTART_SEGMENT_BYTES, layout.slot_bytes)
    n_seg = -(-n_blocks // per_seg)
    ssd_bytes = n_seg * RESTART_SEGMENT_BYTES
    files = SlabFiles(ssd_dir, ssd_bytes, RESTART_SEGMENT_BYTES, io_threads=2, direct=False)
    files.open()
    try:
        for _ in range(n_seg):
            files.take_segment(layout.slot_bytes)
        rng = np.random.default_rng(seed)
        e = np.zeros(n_blocks, dtype=jr.PUT_DTYPE)
        keys = rng.integers(0, 1 << 63, (n_blocks, 2), dtype=np.uint64)
        e["key"] = keys
        i = np.arange(n_blocks)
        pos = i % RESTART_CHAIN
        e["parent"][pos > 0] = keys[i[pos > 0] - 1]
        e["depth"] = pos
        e["addr"] = ((i // per_seg) << SLOT_BITS) | (i % per_seg)
        base = files.next_seq()
        e["seq"] = base + i.astype(np.uint64)
        picks = rng.choice(n_blocks, size=min(sample, n_blocks), replace=False)
        data = rng.integers(0, 256, (len(picks), layout.slot_bytes), dtype=np.uint8)
        data[:, layout.block_bytes:] = 0
        for j, b in enumerate(picks.tolist()):
            key = keys[b].tobytes()
            e["csum"][b] = files.write_slot(int(e["addr"][b]), memoryview(data[j]), key,
                                            layout.block_bytes)
            e["seq"][b] = files.seq_of(np.array([e["addr"][b]]))[0]
        ld = dict(RESTART_LAYOUT, tp_rank=0, tp_size=1)
        records = [jr.encode_ns(jr.NamespaceRecord(
            namespace_digest(RESTART_MODEL, layout), RESTART_MODEL, "", ld))]
        records += [jr.encode_seg(s, layout.slot_bytes) for s in range(n_seg)]
        records.append(e)
        jr.Journal(files.directory / "journal", files.pool).rewrite(records)
    finally:
        files.close()
    return ssd_bytes, [keys[b].tobytes() for b in picks.tolist()], \
        data[:, :layout.block_bytes].copy()


def _stats(stub, pb):
    import grpc
    try:
        return stub.GetStats(pb.GetStatsRequest(), timeout=1)
    except grpc.RpcError:
        return None


def _first_answer(proc, sock: Path, log_path: Path, deadline: float, timeout_s: float):
    """Poll a starting daemon until GetStats answers: (channel, stats). RuntimeError if it
    exits first or the deadline passes."""
    import grpc
    from kvstore.v1 import kvstore_pb2 as pb
    from kvstore.v1 import kvstore_pb2_grpc as pb_grpc
    channel = None
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"kvstore serve exited with {proc.returncode}:\n"
                                   f"{log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"kvstore serve did not answer in {timeout_s:g}s")
            if sock.exists():
                if channel is None:
                    channel = grpc.insecure_channel(f"unix:{sock}")
                st = _stats(pb_grpc.KVStoreStub(channel), pb)
                if st is not None:
                    return channel, st
            time.sleep(POLL_S)
    except BaseException:
        if channel is not None:
            channel.close()
        raise


def _terminate(proc, wait_s: float) -> None:
    """SIGTERM a daemon still running, SIGKILL it if it does not exit within wait_s."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def time_daemon(size_bytes: int, chunk_bytes: int, directory: Path, timeout_s: float,
                wait_populated: bool) -> dict:
    """Start a daemon with this arena size; time readiness, full capacity, populated pages."""
    from kvstore.v1 import kvstore_pb2 as pb
    from kvstore.v1 import kvstore_pb2_grpc as pb_grpc

    work = Path(tempfile.mkdtemp(prefix="kvstore-bench-startup-"))
    shm = Path(tempfile.mkdtemp(prefix="kvstore-bench-startup-", dir=directory))
    sock, log_path = work / "kv.sock", work / "daemon.log"
    row: dict = {}
    with open(log_path, "w") as log:
        t0 = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvstore", "serve", "--socket", str(sock), "--shm-dir",
             str(shm), "--dram-bytes", str(size_bytes), "--chunk-bytes", str(chunk_bytes)],
            stdout=log, stderr=subprocess.STDOUT)
    channel = None
    try:
        deadline = t0 + timeout_s
        channel, st = _first_answer(proc, sock, log_path, deadline, timeout_s)
        row["ready_s"] = time.monotonic() - t0
        dram = next(t for t in st.tiers if t.tier == pb.TIER_DRAM)
        row["capacity_bytes"] = dram.capacity_bytes
        row["ready_bytes_at_ready"] = dram.ready_bytes
        stub = pb_grpc.KVStoreStub(channel)
        while dram.ready_bytes < dram.capacity_bytes:
            if time.monotonic() > deadline:
                raise RuntimeError(f"DRAM capacity not ready in {timeout_s:g}s "
                                   f"({dram.ready_bytes} of {dram.capacity_bytes} bytes)")
            time.sleep(POLL_S)
            st = _stats(stub, pb)
            if st is not None:
                dram = next(t for t in st.tiers if t.tier == pb.TIER_DRAM)
        row["full_s"] = time.monotonic() - t0
        row["populated_s"] = row["reserve_s"] = None
        while time.monotonic() < deadline:
            text = log_path.read_text()
            m = _RESERVED.search(text)
            if m and row["reserve_s"] is None:
                row["reserve_s"] = float(m.group(1))
            if not wait_populated and m:
                break
            if _POPULATED.search(text):
                row["populated_s"] = time.monotonic() - t0
                break
            time.sleep(0.05)
    finally:
        if channel is not None:
            channel.close()
        _terminate(proc, 30)
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    return row


def time_restart(n_blocks: int, dram_bytes: int, chunk_bytes: int, directory: Path,
                 ssd_parent: Path | None, timeout_s: float) -> dict:
    """Restart on an SSD index of ``n_blocks`` (make_ssd_dir): time the first answer, a DRAM
    put + get + lookup answered while the index loads, the index loaded (SSD ready_bytes ==
    capacity), and check the sampled SSD blocks are then served byte for byte."""
    import numpy as np

    from kvstore.client import KVClient
    from kvstore.core.layout import KVLayout
    from kvstore.v1 import kvstore_pb2 as pb
    from kvstore.v1 import kvstore_pb2_grpc as pb_grpc

    work = Path(tempfile.mkdtemp(prefix="kvstore-bench-restart-"))
    shm = Path(tempfile.mkdtemp(prefix="kvstore-bench-restart-", dir=directory))
    ssd_dir = Path(tempfile.mkdtemp(prefix="kvstore-bench-restart-", dir=ssd_parent)) / "ssd"
    sock, log_path = work / "kv.sock", work / "daemon.log"
    row: dict = {"blocks": n_blocks}
    proc = channel = None
    try:
        t = time.perf_counter()
        ssd_bytes, keys, data = make_ssd_dir(ssd_dir, n_blocks)
        row["build_s"] = time.perf_counter() - t
        with open(log_path, "w") as log:
            t0 = time.monotonic()
            proc = subprocess.Popen(
                [sys.executable, "-m", "kvstore", "serve", "--socket", str(sock), "--shm-dir",
                 str(shm), "--dram-bytes", str(dram_bytes), "--chunk-bytes", str(chunk_bytes),
                 "--ssd-dir", str(ssd_dir), "--ssd-bytes", str(ssd_bytes),
                 "--ssd-segment-bytes", str(RESTART_SEGMENT_BYTES)],
                stdout=log, stderr=subprocess.STDOUT)
        deadline = t0 + timeout_s

        channel, st = _first_answer(proc, sock, log_path, deadline, timeout_s)
        stub = pb_grpc.KVStoreStub(channel)

        def ssd_row(st=None):
            st = st or _stats(stub, pb)
            return None if st is None else next(x for x in st.tiers if x.tier == pb.TIER_SSD)

        ssd = ssd_row(st)
        row["ready_s"] = time.monotonic() - t0
        row["loading_at_ready"] = ssd.ready_bytes < ssd.capacity_bytes
        layout = KVLayout(**RESTART_LAYOUT)
        with KVClient(str(sock)) as c, ThreadPoolExecutor(1) as pool:
            ns = c.namespace(RESTART_MODEL, layout)

            def dram_ops() -> tuple[float, bool]:
                """Two rounds of put + get + lookup of 8 new blocks (the first pays the
                client's one-time start-up); (seconds of the second, bytes right)."""
                rng, ok, took = np.random.default_rng(1), True, 0.0
                for _ in range(2):
                    mine = [rng.bytes(16) for _ in range(8)]
                    vals = rng.integers(0, 256, (8, *layout.block_shape), dtype=np.uint8)
                    t = time.monotonic()
                    ns.put(mine, vals).result(timeout=timeout_s)
                    got = np.asarray(ns.get(mine).result(timeout=timeout_s))
                    ok &= bool(np.array_equal(got, vals) and ns.lookup(mine).num_cached == 8)
                    took = time.monotonic() - t
                return took, ok

            ops = pool.submit(dram_ops)      # while this thread watches the index load
            ssd = ssd_row()
            while ssd is None or ssd.ready_bytes < ssd.capacity_bytes:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the SSD index did not load in {timeout_s:g}s")
                time.sleep(POLL_S)
                ssd = ssd_row()
            row["ssd_loaded_s"] = time.monotonic() - t0
            row["dram_during_load"] = ops.done()     # both rounds answered before it loaded
            row["dram_ops_s"], row["dram_ok"] = ops.result(timeout=timeout_s)
            row["recovered_blocks"] = ssd.recovered_blocks
            exact = 0
            for k, want in zip(keys, data):
                out = np.asarray(ns.get([k]).result(timeout=timeout_s))
                exact += int(out.size == want.size and np.array_equal(out.reshape(-1), want))
            row["ssd_sample"], row["ssd_sample_exact"] = len(keys), exact
    finally:
        if channel is not None:
            channel.close()
        _terminate(proc, 60)
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(ssd_dir.parent, ignore_errors=True)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kvstore bench startup", description=__doc__.splitlines()[0],
                                 allow_abbrev=False)
    ap.add_argument("--sizes", default="1GiB,8GiB,64GiB",
                    help="arena sizes to try, comma-separated (default 1GiB,8GiB,64GiB; sizes "
                         "that do not fit are skipped and said so)")
    ap.add_argument("--chunk-bytes", default="64MiB", help="the daemon's --chunk-bytes")
    ap.add_argument("--shm-dir", type=Path, default=None,
                    help="tmpfs for the arena and the baseline (default /dev/shm); mount one "
                         "sized for the test to try sizes beyond /dev/shm")
    ap.add_argument("--timeout-s", type=float, default=600.0, help="per daemon")
    ap.add_argument("--no-populated", action="store_true",
                    help="do not wait for the daemon to populate every page")
    ap.add_argument("--tiny-size", default="64MiB",
                    help="arena of the reference daemon for ready_vs_tiny (default 64MiB)")
    ap.add_argument("--ssd-blocks", type=int, default=0,
                    help="also the restart case: a daemon restarted on an SSD index of this "
                         "many 4 KiB blocks, e.g. 1000000 (default 0: skip it)")
    ap.add_argument("--ssd-dir", type=Path, default=None,
                    help="where the restart case builds its SSD directory (default: the "
                         "temporary directory; needs ~8 KiB of disk per block)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    try:
        sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
        chunk = parse_size(args.chunk_bytes)
        tiny = parse_size(args.tiny_size)
    except ValueError as exc:
        print(f"kvstore bench startup: {exc}", file=sys.stderr)
        return 2
    directory = args.shm_dir or default_shm_dir()
    if not sizes or not directory.is_dir():
        print(f"kvstore bench startup: no sizes, or {directory} is not a directory",
              file=sys.stderr)
        return 2
    rows, skipped = [], []
    for size in sizes:
        why = fits(size, directory)
        if why:
            skipped.append({"size_bytes": size, "reason": why})
            continue
        fallocate_s = time_fallocate(size, directory)
        try:
            # Right after the baseline, like the measured daemon: on a host with little memory
            # to spare the baseline evicts page cache, and Python then starts slower.
            tiny_ready_s = time_daemon(tiny, min(chunk, tiny), directory, args.timeout_s,
                                       False)["ready_s"]
            row = time_daemon(size, chunk, directory, args.timeout_s, not args.no_populated)
        except RuntimeError as exc:
            print(f"kvstore bench startup: {format_bytes(size)}: {exc}", file=sys.stderr)
            return 1
        row.update(size_bytes=size, fallocate_s=fallocate_s, tiny_ready_s=tiny_ready_s,
                   ready_vs_tiny=row["ready_s"] / tiny_ready_s,
                   full_vs_fallocate=row["full_s"] / fallocate_s,
                   reserve_vs_fallocate=(row["reserve_s"] / fallocate_s
                                         if row["reserve_s"] is not None else None))
        rows.append(row)
    if not rows:
        print("kvstore bench startup: no size fits here: "
              + "; ".join(f"{format_bytes(s['size_bytes'])}: {s['reason']}" for s in skipped),
              file=sys.stderr)
        return 1
    restart = None
    if args.ssd_blocks > 0:
        try:
            restart = time_restart(args.ssd_blocks, tiny, min(chunk, tiny), directory,
                                   args.ssd_dir, args.timeout_s)
            restart["tiny_ready_s"] = time_daemon(tiny, min(chunk, tiny), directory,
                                                  args.timeout_s, False)["ready_s"]
            restart["ready_vs_tiny"] = restart["ready_s"] / restart["tiny_ready_s"]
        except (RuntimeError, OSError) as exc:
            print(f"kvstore bench startup: restart on {args.ssd_blocks} SSD blocks: {exc}",
                  file=sys.stderr)
            return 1
    result = {"directory": str(directory), "chunk_bytes": chunk, "tiny_size_bytes": tiny,
              "sizes": rows,
              "skipped": skipped, "max_ready_s": max(r["ready_s"] for r in rows),
              "restart": restart}
    if restart is not None:
        result["restart_ready_s"] = restart["ready_s"]
        result["restart_ssd_loaded_s"] = restart["ssd_loaded_s"]
    lines = [f"kvstore bench startup ({directory}; goals: ready <= 1.5 s, full capacity <= 1.2x "
             "fallocate)",
             f"vs tiny: ready s over that of a daemon with a {format_bytes(tiny)} arena started "
             "just before it",
             f"{'arena':>10} {'ready s':>8} {'vs tiny':>8} {'full s':>8} {'fallocate s':>12} "
             f"{'full/falloc':>12} {'reserve s':>10} {'res/falloc':>11} {'populated s':>12}"]
    def opt(v, fmt):
        return format(v, fmt) if v is not None else "-"
    for r in rows:
        lines.append(f"{format_bytes(r['size_bytes']):>10} {r['ready_s']:>8.2f} "
                     f"{r['ready_vs_tiny']:>7.2f}x {r['full_s']:>8.2f} {r['fallocate_s']:>12.2f} "
                     f"{r['full_vs_fallocate']:>11.2f}x {opt(r['reserve_s'], '.2f'):>10} "
                     f"{opt(r['reserve_vs_fallocate'], '.2f'):>10}x "
                     f"{opt(r['populated_s'], '.2f'):>12}")
    for s in skipped:
        lines.append(f"{format_bytes(s['size_bytes']):>10} skipped: {s['reason']}")
    lines.append(f"max ready: {result['max_ready_s']:.2f} s")
    if restart is not None:
        r = restart
        lines.append(
            f"restart on an SSD index of {r['blocks']:,} blocks: socket answers after "
            f"{r['ready_s']:.2f} s ({r['ready_vs_tiny']:.2f}x a daemon without SSD, "
            f"{r['tiny_ready_s']:.2f} s), index loaded after {r['ssd_loaded_s']:.2f} s "
            f"({r['recovered_blocks']:,} blocks); DRAM put+get+lookup of 8 blocks "
            f"{r['dram_ops_s'] * 1e3:.0f} ms (second round), "
            + ("answered while the index loaded" if r["dram_during_load"]
               else "not done before the load ended") +
            f"{'' if r['dram_ok'] else ' (WRONG BYTES)'}; {r['ssd_sample_exact']}/"
            f"{r['ssd_sample']} sampled SSD blocks byte-exact after the load")
    emit(result, args.json, lines)
    return 0
