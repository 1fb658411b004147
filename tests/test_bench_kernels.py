"""`kvstore bench kernels` and `kvstore bench gpu` as a user runs them (real processes)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch


def bench(*args: str, timeout: float = 120):
    return subprocess.run([sys.executable, "-m", "kvstore", "bench", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_bench_kernels_json_reports_ratios_against_a_plain_copy():
    r = bench("kernels", "--json", "--layers", "2", "--kv-heads", "2", "--head-dim", "16",
              "--block-tokens", "16", "--page-tokens", "4", "--blocks", "4", "--repeat", "2")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["impl"] == "torch reference" and res["bytes_per_call"] == 4 * 2 * 2 * 16 * 2 * 16 * 2
    for k in ("gather_vs_copy", "scatter_vs_copy", "gather_int8_vs_copy"):
        assert res[k] > 0


def test_bench_kernels_refuses_bad_options_with_one_line():
    r = bench("kernels", "--block-tokens", "16", "--page-tokens", "5", "--repeat", "1")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert "--page-tokens must divide --block-tokens" in r.stderr


def test_bench_dispatcher_names_unknown_benchmarks():
    r = bench("nope")
    assert r.returncode == 2 and "unknown benchmark 'nope'" in r.stderr
    listing = bench()                     # no name: the list of benchmarks, exit 2
    assert listing.returncode == 2 and "gpu" in listing.stdout and "kernels" in listing.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_bench_gpu_exits_with_one_clear_line_without_cuda():
    r = bench("gpu", "--json")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip().count("\n") == 0 and "needs a CUDA device" in r.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bench_gpu_runs_and_reports_every_ratio():
    r = bench("gpu", "--json", "--layers", "4", "--blocks", "8", "--repeat", "3", timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["transfers"]["arena_pinned"] is True
    for k in ("put_vs_raw", "get_vs_raw"):
        assert res["transfers"][k] > 0
    assert res["kernels"]["impl"] == "triton" and res["kernels"]["gather_vs_copy"] > 0
