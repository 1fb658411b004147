"""`kvstore bench kernels` and `kvstore bench gpu`: in-process through the dispatcher, and the
exit-code contract once through the real CLI."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch


def bench(*args: str, timeout: float = 120):
    return subprocess.run([sys.executable, "-m", "kvstore", "bench", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("layout", ["per_layer", "layer_first"])
def test_bench_kernels_json_reports_ratios_against_a_plain_copy(capsys, layout):
    from kvstore.bench import main
    rc = main(["kernels", "--json", "--layers", "2", "--kv-heads", "2", "--head-dim", "16",
               "--block-tokens", "16", "--page-tokens", "4", "--blocks", "4", "--repeat", "2",
               "--layout", layout])
    out = capsys.readouterr()
    assert rc == 0, out.err
    res = json.loads(out.out)
    assert res["layout"] == layout
    assert res["impl"] == "torch reference" and res["bytes_per_call"] == 4 * 2 * 2 * 16 * 2 * 16 * 2
    for k in ("gather_vs_copy", "scatter_vs_copy", "gather_int8_vs_copy"):
        assert res[k] > 0


def test_bench_kernels_refuses_bad_options_with_one_line(capsys):
    from kvstore.bench import main
    assert main(["kernels", "--block-tokens", "16", "--page-tokens", "5", "--repeat", "1"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "--page-tokens must divide --block-tokens" in err


def test_bench_dispatcher_names_unknown_benchmarks(capsys):
    from kvstore.bench import BENCHMARKS, main
    assert main(["nope"]) == 2
    assert "unknown benchmark 'nope'" in capsys.readouterr().err
    assert main([]) == 2                  # no name: the list of benchmarks
    listing = capsys.readouterr().out
    assert all(name in listing for name in BENCHMARKS) and {"gpu", "kernels"} <= set(BENCHMARKS)


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


def test_bench_gpu_transfer_harness_runs_on_cpu_tensors():
    # The GPU benchmark's harness (private daemon, fresh keys per put, byte check of the get)
    # on CPU tensors, so a GPU run does not find its bugs first. Not GPU figures.
    from kvstore.bench import gpu
    args = gpu._parser().parse_args(["--layers", "2", "--blocks", "4", "--repeat", "2"])
    res = gpu.measure_transfers(args, torch, device="cpu")
    assert res["blocks"] == 4 and res["arena_pinned"] is False
    assert res["bytes"] == 4 * 2 * 2 * 16 * 8 * 128 * 2
    for k in ("put_vs_raw", "get_vs_raw", "sdk_put_gbps", "sdk_get_gbps"):
        assert res[k] > 0
    # the private daemon has an HBM tier (a host pool here): its hit path is measured too
    assert res["hbm_backend"] == "host" and res["hbm_get_vs_d2d"] > 0
