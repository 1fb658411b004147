"""The SGLang HiCache backend end to end: a real SGLang HiCacheController, a real daemon.

SGLang (0.5.23, CPU torch) lives in its own environment (tests/requirements-sglang.txt; .ci/run
builds it and exports KVSTORE_SGLANG_PYTHON). Without one these tests skip and say why. The
SGLang side runs as a child process (kvstore/bench/sglang.py: the rig and the scenarios) with
the test-only torchvision stand-in of tests/sglang_shims on its PYTHONPATH; it loads the backend
the way a server does (``dynamic`` + extra_config, ``interface_v1``) and prints one RESULT line
per check, which these tests assert on. Each child pays SGLang's import (~20-60 s here).
The server smoke test also needs tests/requirements-sglang-server.txt in that environment
(skipped, naming what is missing, without it) and the CPU-only shims of tests/sglang_shims/server.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time

import pytest

from kvstore.core import shmindex

from kvstore.bench.sglang import REPO, child_env, find_sglang_python

SGLANG_PY = find_sglang_python()
pytestmark = pytest.mark.skipif(SGLANG_PY is None, reason=(
    "no SGLang environment: set KVSTORE_SGLANG_PYTHON to an interpreter with sglang==0.5.23 "
    "and kvstore (built as .ci/run does from tests/requirements-sglang.txt)"))


def _results(stdout: str) -> list[dict]:
    return [json.loads(ln[7:]) for ln in stdout.splitlines() if ln.startswith("RESULT ")]


def _child(*args: str) -> subprocess.Popen:
    return subprocess.Popen([SGLANG_PY, "-m", "kvstore.bench.sglang", *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=child_env(), cwd=str(REPO))


def _until(proc: subprocess.Popen, marker: str, lines: list[str]) -> None:
    for ln in proc.stdout:
        lines.append(ln)
        if ln.startswith(marker):
            return
    raise AssertionError(f"child ended before {marker!r}:\n{''.join(lines)[-4000:]}")


def test_layouts_backup_prefetch_share_and_refusals(daemon):
    """Per supported layout: backup then prefetch through the controller, bytes equal; a
    partial prefix hits only its shared pages; a second controller (own host pool, backend and
    daemon connection) prefetches the first one's pages with equal bytes. page_head and MLA
    are refused at registration with a message naming them. The older calls (interface_v1
    off) and the v1 calls read each other's pages."""
    r = subprocess.run([SGLANG_PY, "-m", "kvstore.bench.sglang", "scenario", "layouts",
                        "--socket", daemon.socket], capture_output=True, text=True,
                       env=child_env(), cwd=str(REPO), timeout=600)
    res = _results(r.stdout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    by_layout = {x["layout"]: x for x in res if "layout" in x}
    assert sorted(by_layout) == ["layer_first", "page_first", "page_first_direct"]
    for layout, x in by_layout.items():
        assert x["backed"] == 64, (layout, x)            # 4 pages of 16 tokens
        assert (x["hit"], x["done"], x["same"]) == (64, 64, True), (layout, x)
        assert x["half"] == 32, (layout, x)               # longest cached prefix: 2 pages
        assert (x["hit_b"], x["done_b"], x["same_b"]) == (64, 64, True), (layout, x)
        c = x["counters"]
        assert c["set_pages"] == 4 and c["fallbacks"] == 0, c
        assert c["daemon"]["namespace"]["blocks"] == 4, c
    generic = next(x for x in res if x.get("generic"))
    assert (generic["hit"], generic["done"], generic["same_old"]) == (64, 64, True), generic
    assert generic["backed2"] == 32, generic
    assert (generic["hit2"], generic["done2"], generic["same_v1"]) == (32, 32, True), generic
    refused = {x["refused"]: x["error"] for x in res if "refused" in x}
    assert "layout 'page_head' is not supported" in refused["page_head"]
    assert "MLA" in refused["mla"]


def test_daemon_stalled_killed_restarted_gives_misses_then_reconnects(daemon_factory, tmp_path):
    """Under a live controller the daemon is stalled (SIGSTOP), resumed, SIGKILLed, restarted
    on the same socket: while stalled or gone, prefetch finds nothing and backup stores
    nothing, with no exception in SGLang's threads (they stay alive) and no long stall; each
    time it is back the backend reconnects by itself and serves equal bytes again, and its
    fallbacks reach the daemon."""
    wd = tmp_path / "d"
    wd.mkdir()
    d = daemon_factory("--dram-bytes", "64MiB", workdir=wd)
    proc = _child("scenario", "outage", "--socket", d.socket)
    lines: list[str] = []

    def go() -> None:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    try:
        _until(proc, "WAIT stop", lines)
        os.kill(d.proc.pid, signal.SIGSTOP)
        # Same-host lookups trust the index snapshot until its heartbeat is stale
        # (kvstore.core.shmindex.STALE_S); past that they ask the stalled daemon.
        time.sleep(2 * shmindex.STALE_S)
        go()
        _until(proc, "WAIT cont", lines)
        os.kill(d.proc.pid, signal.SIGCONT)
        go()
        _until(proc, "WAIT kill", lines)
        d.kill()
        go()
        _until(proc, "WAIT restart", lines)
        d2 = daemon_factory("--dram-bytes", "64MiB", workdir=wd)
        go()
        out, _ = proc.communicate(timeout=300)
        lines.append(out)
    finally:
        if d.proc.poll() is None:
            os.kill(d.proc.pid, signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = "".join(lines)
    res = {x["step"]: x for x in _results(text)}
    assert proc.returncode == 0, text[-4000:]
    assert res["stored"]["backed"] == 48
    for step in ("stalled", "down"):
        x = res[step]
        assert (x["hit"], x["done"], x["backed"]) == (0, 0, 0), x
        assert x["threads_alive"] and x["seconds"] < 30, x
    resumed = res["resumed"]
    assert (resumed["hit"], resumed["done"], resumed["same"]) == (48, 48, True), resumed
    back = res["back"]
    assert back["backed"] == 48 and (back["hit"], back["done"], back["same"]) == (48, 48, True)
    assert back["counters"]["fallbacks"] >= 3, back
    assert back["counters"]["daemon"]["recompute_fallbacks"] >= 1, back
    assert "Traceback" not in text, text[-4000:]
    d2.close()


@pytest.mark.slow
def test_bench_sglang_smoke():
    """`kvstore bench sglang --json` runs both backends over the same pages and reports the
    ratio (small: 8 pages, one round)."""
    import sys
    r = subprocess.run([sys.executable, "-m", "kvstore", "bench", "sglang", "--pages", "8",
                        "--rounds", "1", "--json"], capture_output=True, text=True,
                       cwd=str(REPO), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["prefetch_vs_file_backend"] > 0 and res["kvstore"]["prefetch_s"] > 0
    assert res["file"]["backup_s"] > 0 and res["pages"] == 8


SERVER_SHIMS = REPO / "tests" / "sglang_shims" / "server"
# Modules the server imports beyond the HiCache path (tests/requirements-sglang-server.txt).
SERVER_MODULES = ("uvicorn", "fastapi", "uvloop", "multipart", "setproctitle", "xgrammar",
                  "openai", "partial_json_parser")


def _server_deps_missing(py: str) -> list[str]:
    code = ("import importlib.util as u, sys\n"
            f"print(' '.join(m for m in {SERVER_MODULES!r} if u.find_spec(m) is None))")
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join((str(SERVER_SHIMS), env["PYTHONPATH"]))
    r = subprocess.run([py, "-c", code], capture_output=True, text=True, env=env, timeout=60,
                       check=False)
    return r.stdout.split() if r.returncode == 0 else ["(interpreter failed)"]


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _generate(base: str, ids: list[int], max_new: int) -> tuple[list[int], float]:
    """Greedy ``max_new`` tokens for ``ids`` from SGLang's /generate (streamed), and the time
    to the first streamed chunk (TTFT, seconds)."""
    import urllib.request
    body = json.dumps({"input_ids": ids, "stream": True,
                       "sampling_params": {"temperature": 0.0, "max_new_tokens": max_new,
                                           "ignore_eos": True}}).encode()
    req = urllib.request.Request(base + "/generate", data=body,
                                 headers={"Content-Type": "application/json"})
    t0 = time.monotonic()
    ttft = None
    last: dict = {}
    with urllib.request.urlopen(req, timeout=300) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            if ttft is None:
                ttft = time.monotonic() - t0
            last = json.loads(line[5:])
    return last["output_ids"], ttft


def _dram_stats(socket_path: str) -> dict:
    import grpc

    from kvstore.v1 import kvstore_pb2 as pb
    from kvstore.v1 import kvstore_pb2_grpc as pb_grpc
    with grpc.insecure_channel(f"unix:{socket_path}") as ch:
        st = pb_grpc.KVStoreStub(ch).GetStats(pb.GetStatsRequest(), timeout=5)
    dram = next(t for t in st.tiers if t.tier == pb.TIER_DRAM)
    return {"blocks": dram.blocks, "bytes_in": dram.bytes_in, "bytes_out": dram.bytes_out,
            "hits": dram.hits, "lookups": st.lookups}


@pytest.mark.slow
def _remove_server_shm(before: set[str]) -> None:
    """The server's processes leave shared memory behind when they are killed (SGLang's
    ``sglang_loads_*`` segments, multiprocessing's ``sem.mp-*`` semaphores): remove what
    appeared while it ran."""
    time.sleep(0.5)     # its children exit after the group signal
    for name in set(os.listdir("/dev/shm")) - before:
        if name.startswith(("sglang_", "sem.mp-")):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join("/dev/shm", name))


def test_sglang_server_serves_a_repeated_prompt_from_kvstore(daemon_factory, tmp_path):
    """A real ``sglang.launch_server`` (CPU engine, tiny random-weight Llama, HiCache with the
    kvstore dynamic backend as the README launches it, plus the test-only shims of
    tests/sglang_shims/server): a 320-token prompt (over the 256-token prefetch threshold) is
    answered greedily, its pages are backed up into the daemon; after /flush_cache (device and
    host caches emptied) the same prompt is answered from kvstore (the daemon serves its pages)
    with the same tokens."""
    missing = _server_deps_missing(SGLANG_PY)
    if missing:
        pytest.skip(f"the SGLang interpreter lacks the server's dependencies ({', '.join(missing)});"
                    " install tests/requirements-sglang-server.txt with --no-deps")
    import random
    import urllib.request

    from kvstore.bench.vllm_engine import make_model
    model = tmp_path / "model"
    make_model(SGLANG_PY, str(model), "tiny", seed=0)
    d = daemon_factory("--dram-bytes", "64MiB", "--chunk-bytes", "4MiB")
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    extra = json.dumps({"backend_name": "kvstore", "module_path": "kvstore.client.sglang",
                        "class_name": "KVStoreHiCacheStorage", "interface_v1": 1,
                        "socket": d.socket})
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join((str(SERVER_SHIMS), env["PYTHONPATH"]))
    env.update(SGLANG_USE_CPU_ENGINE="1", OMP_NUM_THREADS="1")
    log_path = tmp_path / "server.log"
    shm_before = set(os.listdir("/dev/shm"))
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [SGLANG_PY, "-m", "sglang.launch_server", "--model-path", str(model),
             "--skip-tokenizer-init", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
             "--attention-backend", "torch_native", "--disable-cuda-graph", "--page-size", "16",
             "--max-total-tokens", "1024", "--enable-hierarchical-cache", "--hicache-size", "1",
             "--hicache-io-backend", "direct", "--hicache-mem-layout", "layer_first",
             "--hicache-write-policy", "write_through",
             "--hicache-storage-backend", "dynamic",
             "--hicache-storage-backend-extra-config", extra],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(tmp_path),
            start_new_session=True)
        try:
            deadline = time.monotonic() + 400
            while True:
                assert server.poll() is None, f"server exited {server.returncode}:\n" + \
                    log_path.read_text()[-6000:]
                assert time.monotonic() < deadline, "server not up:\n" + log_path.read_text()[-6000:]
                try:
                    with urllib.request.urlopen(base + "/health", timeout=5) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                time.sleep(1)
            rng = random.Random(7)
            prompt = [rng.randrange(10, 2000) for _ in range(320)]
            first, ttft_cold = _generate(base, prompt, 8)
            # write_through backs pages up to the host pool, then to kvstore, asynchronously
            deadline = time.monotonic() + 60
            while _dram_stats(d.socket)["blocks"] < 320 // 16 - 1 and time.monotonic() < deadline:
                time.sleep(0.5)
            stored = _dram_stats(d.socket)
            assert stored["blocks"] >= 320 // 16 - 1, stored
            with urllib.request.urlopen(urllib.request.Request(base + "/flush_cache", data=b""),
                                        timeout=60) as r:
                assert r.status == 200
            second, ttft_l3 = _generate(base, prompt, 8)
            after = _dram_stats(d.socket)
            print(f"TTFT cold {ttft_cold * 1000:.0f} ms, from kvstore {ttft_l3 * 1000:.0f} ms; "
                  f"daemon {stored} -> {after}")
            assert len(first) == 8 and second == first, (first, second)
            page_bytes = stored["bytes_in"] // stored["blocks"]
            assert after["bytes_out"] - stored["bytes_out"] >= (320 // 16 - 1) * page_bytes, \
                (stored, after)
            assert after["hits"] > stored["hits"], (stored, after)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
            _remove_server_shm(shm_before)
