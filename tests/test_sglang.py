"""The SGLang HiCache backend end to end: a real SGLang HiCacheController, a real daemon.

SGLang (0.5.23, CPU torch) lives in its own environment (tests/requirements-sglang.txt; .ci/run
builds it and exports KVSTORE_SGLANG_PYTHON). Without one these tests skip and say why. The
SGLang side runs as a child process (kvstore/bench/sglang.py: the rig and the scenarios) with
the test-only torchvision stand-in of tests/sglang_shims on its PYTHONPATH; it loads the backend
the way a server does (``dynamic`` + extra_config, ``interface_v1``) and prints one RESULT line
per check, which these tests assert on. Each child pays SGLang's import (~20-60 s here).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

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
