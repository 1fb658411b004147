"""`kvstore bench prefetch` and `kvstore bench recompute` run end to end (small sizes) and report
the figures their READMEs promise."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow   # each starts several daemons; run with -m slow


def _bench(*args, timeout=240):
    r = subprocess.run([sys.executable, "-m", "kvstore", "bench", *args], capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def test_bench_prefetch_small():
    res = _bench("prefetch", "--requests", "6", "--blocks", "4", "--block-kib", "64",
                 "--compute-ms", "30", "--ssd-read-limit", "50MB/s", "--json")
    w, wo = res["with_hints"], res["without_hints"]
    assert w["prefetch_issued"] == 6 and wo["prefetch_issued"] == 0
    assert w["on_time"] + w["late"] == 6
    assert res["wait_ratio_with_vs_without"] == pytest.approx(
        w["wait_mean_s"] / wo["wait_mean_s"])


def test_bench_recompute_tiny_with_plot(tmp_path):
    pytest.importorskip("transformers")
    png = tmp_path / "r.png"
    res = _bench("recompute", "--shape", "tiny", "--prefix-tokens", "256", "--chunk-tokens",
                 "64", "--factors", "0.5,4", "--plot", str(png), "--json")
    assert len(res["points"]) == 2 and res["crossover_bps"] > 0
    for p in res["points"]:
        assert p["load_all_s"] > 0 and p["recompute_all_s"] > 0 and p["hybrid_s"] > 0
        assert p["computed_tokens"] + 16 * p["loaded_blocks"] == 256
    pytest.importorskip("matplotlib")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
