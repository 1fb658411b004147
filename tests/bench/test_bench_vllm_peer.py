"""`kvstore bench vllm --peer lmcache` through the real CLI.

Without an LMCache environment the command must say how to make one and exit 2, never fall
back to a run without the peer. With one (found through $KVSTORE_LMCACHE_PYTHON), a tiny run
must time all three engines, see both caches serve the prefix and give identical greedy tokens.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kvstore.bench.lmcache_peer import ENV_VAR, find_lmcache_python


def _bench(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "kvstore", "bench", "vllm", *args],
                          check=False, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})))


def test_peer_without_lmcache_env_exits_2_saying_how_to_make_one(tmp_path):
    missing = str(tmp_path / "no-such-env" / "bin" / "python")
    r = _bench("--peer", "lmcache", "--lmcache-python", missing)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert r.stdout == ""
    assert f"{missing} does not exist" in r.stderr
    assert "no LMCache environment found" in r.stderr
    assert "pip install lmcache==0.5.6" in r.stderr
    assert r.stderr.count("\n") == 1       # one line, no traceback


def test_peer_env_var_naming_a_python_without_lmcache_is_refused(tmp_path):
    # This interpreter has kvstore but neither vLLM nor lmcache: a named environment that
    # cannot run the comparison is reported, not replaced by another one.
    r = _bench("--peer", "lmcache", env={ENV_VAR: sys.executable})
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert f"{sys.executable} cannot run the comparison: missing modules: vllm, lmcache" in r.stderr


def test_lmcache_python_without_peer_is_a_usage_error():
    r = _bench("--lmcache-python", "/usr/bin/python3")
    assert r.returncode == 2
    assert "--lmcache-python needs --peer lmcache" in r.stderr


LMCACHE_PY = os.environ.get(ENV_VAR)


@pytest.mark.slow
@pytest.mark.skipif(not LMCACHE_PY, reason=(
    f"no LMCache environment: set ${ENV_VAR} to the python of a copy of the vLLM environment "
    "with lmcache==0.5.6 and kvstore installed (`kvstore bench vllm --peer lmcache` prints how)"))
def test_peer_lmcache_tiny_run_times_three_engines_with_identical_tokens():
    py, why = find_lmcache_python(LMCACHE_PY)
    assert py is not None, why     # the variable is set: an unusable environment is a failure
    r = _bench("--peer", "lmcache", "--lmcache-python", py, "--shape", "tiny",
               "--prefix-tokens", "512", "--suffix-tokens", "16", "--requests", "3", "--json",
               timeout=1500)
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads(r.stdout)
    assert res["peer"] == "lmcache"
    assert res["tokens_identical"] is True, (res["first_tokens"], res["continuations"])
    assert len(res["continuations"]["none"]) == res["check_tokens"] == 8
    for name in ("ttft_baseline_all_s", "ttft_connector_warm_all_s", "ttft_peer_warm_all_s"):
        assert len(res[name]) == 2 and all(t > 0 for t in res[name]), name
    # Both caches served the whole 512-token prefix (4 vLLM blocks, 2 LMCache chunks) on every
    # timed request; without that the TTFT ratio would compare a hit with a miss.
    assert res["cached_tokens_connector_warm"] == [512, 512]
    assert all(c >= 512 for c in res["cached_tokens_peer_warm"]), res["cached_tokens_peer_warm"]
    assert res["loaded_blocks"] >= 2 * 4
    assert res["kvstore_vs_peer_warm"] == pytest.approx(
        res["ttft_connector_warm_s"] / res["ttft_peer_warm_s"])
    assert res["speedup_peer_warm_vs_baseline"] == pytest.approx(
        res["ttft_baseline_s"] / res["ttft_peer_warm_s"])
