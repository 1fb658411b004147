"""SGLang HiCache backup and prefetch through kvstore against SGLang's own file backend, in
one run: the test rig and ``kvstore bench sglang``.

SGLang lives in its own environment (tests/requirements-sglang.txt; .ci/run builds it and
exports KVSTORE_SGLANG_PYTHON). Everything that imports SGLang runs in that interpreter as
``python -m kvstore.bench.sglang {scenario,run} ...`` with tests/sglang_shims on PYTHONPATH;
the ``kvstore bench sglang`` entry point (``main``) only starts it and prints its answer.

The rig is a real ``HiCacheController`` (gloo, world size 1) over a CPU MHA device pool and an
unpinned host pool, with the storage backend loaded the way a server loads it (``dynamic`` +
extra_config for kvstore, SGLang's own ``file`` backend for the baseline). Backup and prefetch
are driven the way SGLang's tree cache drives them: ``write_storage`` then the backup ack;
``prefetch`` (hit query: ``batch_exists``), host pages allocated for the hit, then the
transfer (``batch_get_v1``) and its acks.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
SHIMS = REPO / "tests" / "sglang_shims"
SGLANG_VERSION = "0.5.23"


def find_sglang_python() -> str | None:
    """$KVSTORE_SGLANG_PYTHON, or the CI cache's env, when it imports sglang and kvstore."""
    candidates = [os.environ.get("KVSTORE_SGLANG_PYTHON"),
                  str(Path.home() / ".cache" / "kvstore-ci" / f"sglang-{SGLANG_VERSION}" / "bin"
                      / "python")]
    for py in candidates:
        if py and os.path.exists(py):
            r = subprocess.run([py, "-c", "import importlib.util as u, sys; sys.exit(0 if "
                                "u.find_spec('sglang') and u.find_spec('kvstore.client') else 1)"],
                               capture_output=True, timeout=60)
            if r.returncode == 0:
                return py
    return None


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SHIMS), env.get("PYTHONPATH")) if p)
    env.setdefault("SGLANG_LOG_LEVEL", "warning")
    return env


# ---------------------------------------------------------------------------------------------
# The rig (SGLang interpreter only)
# ---------------------------------------------------------------------------------------------
def _init_dist() -> None:
    import socket

    import torch.distributed as dist
    if dist.is_initialized():
        return
    with socket.socket() as s:            # a free loopback port for gloo's store
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    from sglang.srt.runtime_context import get_parallel
    get_parallel().override_permanently(
        tp_size=1, tp_rank=0, pp_size=1, pp_rank=0, attn_tp_size=1, attn_tp_rank=0,
        attn_cp_size=1, attn_cp_rank=0, attn_dcp_size=1, attn_dcp_rank=0, attn_dp_rank=0,
        attn_dp_size=1, dcp_size=1, dcp_rank=0, enable_dp_attention=False)


def kvstore_extra(socket: str, **more) -> dict:
    return {"backend_name": "kvstore", "module_path": "kvstore.client.sglang",
            "class_name": "KVStoreHiCacheStorage", "interface_v1": 1, "socket": socket,
            "io_timeout_s": 2.0, "retry_s": 0.2, **more}


class Rig:
    """One "engine": device pool, host pool of ``layout``, controller with ``backend``."""

    def __init__(self, layout: str, backend: str, extra: dict | None = None, *, page: int = 16,
                 layers: int = 4, heads: int = 2, head_dim: int = 64, tokens: int = 4096,
                 model: str = "tiny-llama", dtype: str = "bfloat16"):
        import threading

        import torch
        import torch.distributed as dist
        from sglang.srt.managers.cache_controller import HiCacheController
        from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
        from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
        from sglang.srt.mem_cache.pool_host.base import host_memory_budget_scope
        from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost

        _init_dist()
        dt = getattr(torch, dtype)
        self.page = page
        dev = MHATokenToKVPool(tokens, page, dt, heads, head_dim, layers, "cpu", False,
                               start_layer=0, end_layer=layers)
        # SGLang sizes host pools against free RAM minus a reserve of several GB; the rig's pool
        # is a few MiB, so it books against SGLang's own budget scope instead (a loaded CI box
        # may have less free RAM than the reserve).
        with host_memory_budget_scope(1 << 30):
            self.host = MHATokenToKVPoolHost(
                dev.get_device_pool_infos()[0].buffer_info, 2.0, 0, page, layout,
                pin_memory=False, device_capacity_tokens=dev.size, start_layer=0,
                end_layer=layers)
        alloc = PagedTokenToKVPoolAllocator(tokens, page, dt, "cpu", dev, need_sort=False)
        self.cc = HiCacheController(alloc, self.host, page, dist.group.WORLD, threading.Event(),
                                    io_backend="direct", storage_backend=backend,
                                    model_name=model, storage_backend_extra_config=extra or {},
                                    prefetch_threshold=page)
        self.backend = self.cc.storage_backend

    def fill(self, n_tokens: int, seed: int):
        """Host pages for n_tokens holding seeded random values; returns their indices."""
        import torch
        idx = self.host.alloc(n_tokens)
        g = torch.Generator().manual_seed(seed)
        for j in range(0, n_tokens, self.page):
            pg = self.host.get_data_page(int(idx[j]), flat=False)
            vals = torch.randn(pg.shape, generator=g).to(pg.dtype)
            self.host.set_from_flat_data_page(int(idx[j]), vals.flatten())
        return idx

    def pages(self, idx) -> list:
        return [self.host.get_data_page(int(idx[j]), flat=True).clone()
                for j in range(0, len(idx), self.page)]

    def backup(self, idx, tokens: list[int], timeout_s: float = 60.0) -> int:
        from sglang.srt.mem_cache.utils import get_storage_hash_str
        hashes = get_storage_hash_str(tokens, None, page_size=self.page)
        self.cc.write_storage(idx, tokens, hash_value=hashes, prefix_keys=[])
        op = self.cc.ack_backup_queue.get(timeout=timeout_s)
        return op.completed_tokens

    def prefetch(self, tokens: list[int], timeout_s: float = 60.0):
        """(hit tokens from the query, tokens transferred, host indices)."""
        op = self.cc.prefetch(f"r{time.monotonic_ns()}", tokens, None, prefix_keys=[])
        op = self.cc.prefetch_hit_queue.get(timeout=timeout_s)
        hit = op.storage_hit_count
        if hit == 0:
            return 0, 0, None
        idx = self.host.alloc(hit)
        op.host_indices = idx
        self.cc.prefetch_buffer.put(op)
        done = 0
        while True:
            ack = self.cc.ack_prefetch_queue.get(timeout=timeout_s)
            if ack.completed_req:
                break
            done = max(done, ack.completed_tokens)
        return hit, done, idx

    def release(self, idx) -> None:
        if idx is not None:
            self.host.free(idx)

    def close(self) -> None:
        self.cc.detach_storage_backend()


def _tokens(n: int, seed: int) -> list[int]:
    import random
    r = random.Random(seed)
    return [r.randrange(32000) for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# Scenarios for tests/client/test_sglang.py (SGLang interpreter); each prints one JSON line per result
# ---------------------------------------------------------------------------------------------
def _emit(**kv) -> None:
    print("RESULT " + json.dumps(kv), flush=True)


def scenario_layouts(socket: str) -> None:
    """Backup then prefetch in each supported layout, bytes compared; then a second controller
    (another host pool, backend instance and daemon connection) prefetches the first one's
    pages; then the layout and MLA refusals."""
    import torch
    for layout in ("layer_first", "page_first", "page_first_direct"):
        toks = _tokens(4 * 16, len(layout))
        a = Rig(layout, "dynamic", kvstore_extra(socket))
        idx = a.fill(len(toks), seed=len(layout))
        want = a.pages(idx)
        backed = a.backup(idx, toks)
        hit, done, got_idx = a.prefetch(toks)
        same = got_idx is not None and all(torch.equal(x, y) for x, y in zip(want, a.pages(got_idx)))
        half = a.prefetch(toks[:32] + _tokens(32, 99))[0]     # shared first 2 pages only
        b = Rig(layout, "dynamic", kvstore_extra(socket))
        hit_b, done_b, idx_b = b.prefetch(toks)
        same_b = idx_b is not None and all(torch.equal(x, y) for x, y in zip(want, b.pages(idx_b)))
        _emit(layout=layout, backed=backed, hit=hit, done=done, same=same, half=half,
              hit_b=hit_b, done_b=done_b, same_b=same_b, counters=a.backend.counters(daemon=True))
        a.close()
        b.close()
    # The older calls (interface_v1 off: SGLang's generic path, batch_get/batch_set of flat
    # pages) read what v1 stored, and v1 reads what they store.
    toks = _tokens(4 * 16, len("page_first"))
    v1 = Rig("page_first", "dynamic", kvstore_extra(socket))
    old = Rig("page_first", "dynamic", kvstore_extra(socket, interface_v1=0))
    want = v1.pages(v1.fill(len(toks), seed=len("page_first")))
    hit, done, got = old.prefetch(toks)
    same_old = got is not None and all(torch.equal(x, y) for x, y in zip(want, old.pages(got)))
    toks2 = _tokens(2 * 16, 5)
    idx2 = old.fill(len(toks2), seed=5)
    want2 = old.pages(idx2)
    backed2 = old.backup(idx2, toks2)
    hit2, done2, got2 = v1.prefetch(toks2)
    same_v1 = got2 is not None and all(torch.equal(x, y) for x, y in zip(want2, v1.pages(got2)))
    _emit(generic=True, hit=hit, done=done, same_old=same_old, backed2=backed2, hit2=hit2,
          done2=done2, same_v1=same_v1)
    v1.close()
    old.close()
    for layout in ("page_head",):
        try:
            Rig(layout, "dynamic", kvstore_extra(socket))
            _emit(refused=layout, error="")
        except Exception as exc:  # noqa: BLE001 - the message is the result
            _emit(refused=layout, error=f"{type(exc).__name__}: {exc}")
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig

    from kvstore.client.sglang import KVStoreHiCacheStorage
    cfg = HiCacheStorageConfig(tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_cp_rank=0,
                               attn_cp_size=1, is_mla_model=True, enable_storage_metrics=False,
                               is_page_first_layout=False, model_name="m",
                               extra_config=kvstore_extra(socket))
    try:
        KVStoreHiCacheStorage(cfg, {}).register_mem_pool_host(
            Rig("layer_first", "dynamic", kvstore_extra(socket)).host)
        _emit(refused="mla", error="")
    except Exception as exc:  # noqa: BLE001
        _emit(refused="mla", error=f"{type(exc).__name__}: {exc}")


def scenario_outage(socket: str) -> None:
    """The parent stalls (SIGSTOP), resumes, kills and restarts the daemon between steps (line
    protocol: "WAIT x" out, one line in): while it is stalled or gone, prefetch and backup give
    misses without an exception in SGLang's threads; once it is back the backend reconnects on
    its own and stores and serves again."""
    import torch
    toks = _tokens(3 * 16, 7)
    a = Rig("page_first", "dynamic", kvstore_extra(socket))
    idx = a.fill(len(toks), seed=7)
    want = a.pages(idx)

    def wait(what: str) -> None:
        print(f"WAIT {what}", flush=True)
        sys.stdin.readline()

    def unavailable(step: str) -> None:
        t0 = time.monotonic()
        hit, done, _ = a.prefetch(toks)
        backed = a.backup(idx, toks)
        _emit(step=step, hit=hit, done=done, backed=backed, seconds=time.monotonic() - t0,
              threads_alive=a.cc.prefetch_thread.is_alive() and a.cc.backup_thread.is_alive())

    def served(step: str, must_store: bool) -> None:
        deadline = time.monotonic() + 30
        backed = hit = done = 0
        got = None
        while time.monotonic() < deadline:
            backed = a.backup(idx, toks)
            hit, done, got = a.prefetch(toks)
            if hit and (backed or not must_store):
                break
            a.release(got)
            time.sleep(0.3)
        same = got is not None and all(torch.equal(x, y) for x, y in zip(want, a.pages(got)))
        a.release(got)
        _emit(step=step, backed=backed, hit=hit, done=done, same=same,
              counters=a.backend.counters(daemon=True))

    _emit(step="stored", backed=a.backup(idx, toks))
    wait("stop")
    unavailable("stalled")
    wait("cont")
    served("resumed", must_store=False)     # the pages are still in the daemon
    wait("kill")
    unavailable("down")
    wait("restart")
    served("back", must_store=True)         # a new daemon: stored anew, then served
    a.close()


# ---------------------------------------------------------------------------------------------
# The benchmark (SGLang interpreter): kvstore backend vs SGLang's file backend, same pages
# ---------------------------------------------------------------------------------------------
def run_bench(socket: str, pages: int, rounds: int, layout: str, file_dir: str) -> dict:
    import torch
    os.environ["SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR"] = file_dir
    geom = dict(page=64, layers=8, heads=4, head_dim=128, tokens=pages * 64 * 2 + 256)
    toks = _tokens(pages * 64, 1)
    out: dict = {"pages": pages, "layout": layout, "rounds": rounds,
                 "page_bytes": 2 * 8 * 64 * 4 * 128 * 2}
    for name, backend, extra in (("kvstore", "dynamic", kvstore_extra(socket)),
                                 ("file", "file", {})):
        rig = Rig(layout, backend, extra, **geom)
        idx = rig.fill(len(toks), seed=3)
        want = rig.pages(idx)
        best_b, best_p = float("inf"), float("inf")
        for r in range(rounds):
            rtoks = toks if r == 0 else _tokens(pages * 64, 100 + r)   # fresh keys each round
            t0 = time.perf_counter()
            backed = rig.backup(idx, rtoks)
            best_b = min(best_b, time.perf_counter() - t0)
            assert backed == len(rtoks), (name, backed)
            t0 = time.perf_counter()
            hit, done, got = rig.prefetch(rtoks)
            best_p = min(best_p, time.perf_counter() - t0)
            assert hit == len(rtoks), (name, hit)
            if r == 0:
                assert all(torch.equal(x, y) for x, y in zip(want, rig.pages(got))), name
            rig.release(got)
        gb = pages * out["page_bytes"] / 1e9
        out[name] = {"backup_s": best_b, "prefetch_s": best_p, "backup_gbps": gb / best_b,
                     "prefetch_gbps": gb / best_p}
        rig.close()
    out["prefetch_vs_file_backend"] = out["file"]["prefetch_s"] / out["kvstore"]["prefetch_s"]
    out["backup_vs_file_backend"] = out["file"]["backup_s"] / out["kvstore"]["backup_s"]
    return out


def _child_main(argv: list[str]) -> int:
    import logging
    logging.basicConfig(level=logging.WARNING)
    p = argparse.ArgumentParser(prog="python -m kvstore.bench.sglang", allow_abbrev=False)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("scenario")
    s.add_argument("name", choices=["layouts", "outage"])
    s.add_argument("--socket", required=True)
    b = sub.add_parser("run")
    b.add_argument("--socket", required=True)
    b.add_argument("--pages", type=int, default=64)
    b.add_argument("--rounds", type=int, default=3)
    b.add_argument("--layout", default="page_first")
    b.add_argument("--file-dir", required=True)
    a = p.parse_args(argv)
    if a.cmd == "scenario":
        {"layouts": scenario_layouts, "outage": scenario_outage}[a.name](a.socket)
    else:
        _emit(**run_bench(a.socket, a.pages, a.rounds, a.layout, a.file_dir))
    sys.stdout.flush()
    os._exit(0)     # SGLang's daemon threads and gloo must not hold the exit


# ---------------------------------------------------------------------------------------------
# `kvstore bench sglang` (any interpreter): a daemon, the SGLang child, the figures
# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    import shutil
    import tempfile
    p = argparse.ArgumentParser(prog="kvstore bench sglang", description=(
        "Backup and prefetch throughput of SGLang's HiCacheController through the kvstore "
        "backend against SGLang's own file backend (same pages, same run)."), allow_abbrev=False)
    p.add_argument("--pages", type=int, default=64, help="pages of 64 tokens (1 MiB each: 8 layers, 4 kv heads, 128 dims, bf16)")
    p.add_argument("--rounds", type=int, default=3, help="best of this many rounds")
    p.add_argument("--layout", default="page_first",
                   choices=["layer_first", "page_first", "page_first_direct"])
    p.add_argument("--dram-bytes", default="256MiB")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    py = find_sglang_python()
    if py is None:
        print("kvstore bench sglang: no SGLang environment; set KVSTORE_SGLANG_PYTHON "
              f"(build one as .ci/run does: sglang=={SGLANG_VERSION})", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="kvstore-bench-sglang-"))
    shm = Path("/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir())
    shm = Path(tempfile.mkdtemp(prefix="kvstore-bench-sglang-", dir=shm))
    sock = str(work / "kv.sock")
    daemon = subprocess.Popen([sys.executable, "-m", "kvstore", "serve", "--socket", sock,
                               "--shm-dir", str(shm), "--dram-bytes", a.dram_bytes],
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            if daemon.poll() is not None or time.monotonic() > deadline:
                print("kvstore bench sglang: the daemon did not start", file=sys.stderr)
                return 1
            time.sleep(0.05)
        r = subprocess.run([py, "-m", "kvstore.bench.sglang", "run", "--socket", sock,
                            "--pages", str(a.pages), "--rounds", str(a.rounds),
                            "--layout", a.layout, "--file-dir", str(work / "file")],
                           capture_output=True, text=True, env=child_env(), cwd=str(REPO),
                           timeout=1200)
        lines = [ln[7:] for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
        if r.returncode != 0 or not lines:
            print(f"kvstore bench sglang: the SGLang run failed ({r.returncode}):\n"
                  f"{r.stderr[-3000:]}", file=sys.stderr)
            return 1
        res = json.loads(lines[-1])
    finally:
        daemon.terminate()
        daemon.wait(15)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)
    if a.json:
        print(json.dumps(res))
        return 0
    mib = res["page_bytes"] / 2**20
    print(f"SGLang HiCacheController, {res['pages']} pages x {mib:.2f} MiB ({res['layout']}), "
          f"best of {res['rounds']}:")
    for name in ("kvstore", "file"):
        f = res[name]
        print(f"  {name:8s} backup {f['backup_s'] * 1e3:8.1f} ms ({f['backup_gbps']:.2f} GB/s)"
              f"   prefetch {f['prefetch_s'] * 1e3:8.1f} ms ({f['prefetch_gbps']:.2f} GB/s)")
    print(f"  prefetch: kvstore {res['prefetch_vs_file_backend']:.2f}x the file backend; "
          f"backup {res['backup_vs_file_backend']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
