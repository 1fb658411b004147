"""Two vLLM engines (CPU), each with its own daemon ("host A", "host B": separate sockets, arenas),
sharing one cluster tier (a Mooncake master): engine 2 loads the prefix engine 1 computed, and
decodes the same greedy tokens as vLLM without the connector. Once with kv_both on both engines,
once as disaggregated prefill/decode: kv_producer on engine 1 (stores only), kv_consumer on
engine 2 (loads only).

vLLM's own prefix cache is off, so every reuse here went through kvstore; host B's local tiers
start empty, so what engine 2 loads came through the remote tier (asserted from B's REMOTE row).
"""
from __future__ import annotations

import random
import shutil
import time

import pytest

from kvstore.bench.cluster_engines import skip_reason, start_engine
from kvstore.client import KVClient
from kvstore.testing.daemon import DaemonProcess, temp_shm_dir
from kvstore.v1 import kvstore_pb2 as pb
from support.vllm import (BLOCK, MARKS, VOCAB, baseline_outputs, build_model, connector_engine,
                          gen, plain_engine)

pytestmark = [
    *MARKS,
    pytest.mark.skipif(skip_reason("mooncake") is not None,
                       reason=skip_reason("mooncake") or ""),
]

_rng = random.Random(4321)
SHARED = [_rng.randrange(VOCAB) for _ in range(300)]     # 2 full blocks + a 44-token tail
SPLIT = [_rng.randrange(VOCAB) for _ in range(290)]      # the prefill/decode pair's prompt
OTHER = [_rng.randrange(VOCAB) for _ in range(270)]      # the consumer's own new prompt
PROMPTS = {"SHARED": SHARED, "SPLIT": SPLIT, "OTHER": OTHER}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("vllm-cluster")


@pytest.fixture(scope="module")
def model_dir(workdir):
    return build_model(workdir)


@pytest.fixture(scope="module")
def baseline(model_dir, workdir):
    with plain_engine(model_dir, workdir) as eng:
        return baseline_outputs(eng, PROMPTS)


@pytest.fixture(scope="module")
def master(workdir):
    e = start_engine("mooncake", workdir / "mooncake")
    yield e
    e.stop()


@pytest.fixture(scope="module")
def hosts(workdir, master):
    """Daemons A and B, each its own arena and shared-memory dir, both on the master."""
    made = []
    try:
        for name in ("a", "b"):
            wd = workdir / f"host-{name}"
            wd.mkdir()
            shm = temp_shm_dir("kvstore-test-", fallback=workdir)
            d = DaemonProcess(wd, shm, [
                "--dram-bytes", "128MiB", "--chunk-bytes", "16MiB", "--remote", master.url,
                "--remote-segment-bytes", "64MiB", "--remote-buffer-bytes", "16MiB",
                "--remote-deadline-s", "2", "--remote-read-deadline-s", "10"])
            made.append(d)
            d.start()
        yield tuple(made)
    finally:
        for d in made:
            if d.proc is not None:
                d.close()
            shutil.rmtree(d.shm_dir, ignore_errors=True)


_TIMEOUTS = {"retry_s": 0.5, "lookup_timeout_s": 2.0, "io_timeout_s": 10.0,
             "load_timeout_s": 10.0}


def _engine(model_dir, daemon, workdir, name, kv_role="kv_both"):
    return connector_engine(model_dir, daemon, workdir, name, timeouts=_TIMEOUTS,
                            kv_role=kv_role)


def _remote(daemon) -> pb.TierStats:
    with KVClient(daemon.socket, shared_memory=False) as c:
        return next(t for t in c.stats().tiers if t.tier == pb.TIER_REMOTE)


def _wait_remote_bytes_in(daemon, at_least: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while _remote(daemon).bytes_in < at_least:
        assert time.monotonic() < deadline, f"host A wrote {_remote(daemon).bytes_in} bytes " \
                                            f"remotely, expected {at_least}"
        time.sleep(0.05)


def _gen(eng, name):
    return gen(eng, PROMPTS[name])


def test_engine_2_loads_the_prefix_engine_1_computed(model_dir, workdir, hosts, baseline):
    a, b = hosts
    with _engine(model_dir, a, workdir, "both-1") as e1:
        out, cached = _gen(e1, "SHARED")
        assert out == baseline["SHARED"] and cached == 0
        w = e1.stats()["worker"]
        assert w["stored_blocks"] == 2
        block_bytes = w["stored_bytes"] // 2
    _wait_remote_bytes_in(a, 2 * block_bytes)          # A's background writer sent them
    hits0 = _remote(b).hits
    with _engine(model_dir, b, workdir, "both-2") as e2:
        out, cached = _gen(e2, "SHARED")
        assert out == baseline["SHARED"] and cached == 2 * BLOCK
        s = e2.stats()
        assert s["worker"]["loaded_blocks"] == 2 and s["worker"]["load_failed_blocks"] == 0
        assert s["scheduler"]["fallbacks"] == 0
    assert _remote(b).hits - hits0 == 2                 # B's tiers had none: the cluster tier


def test_producer_stores_only_consumer_loads_only(model_dir, workdir, hosts, baseline):
    a, b = hosts
    with _engine(model_dir, a, workdir, "producer", kv_role="kv_producer") as prod:
        out, cached = _gen(prod, "SPLIT")
        assert out == baseline["SPLIT"] and cached == 0
        # The producer reports the request finished once its blocks are readable from the
        # cluster tier: the consumer below waits for that, not for the daemon's counters.
        deadline = time.monotonic() + 30
        while prod.stats()["worker"]["remote_placed_blocks"] < 2:
            assert time.monotonic() < deadline, prod.stats()["worker"]
            time.sleep(0.05)
        w = prod.stats()["worker"]
        assert w["stored_blocks"] == 2 and w["remote_flush_timeouts"] == 0
        # A producer never loads, even what its own daemon holds.
        out, cached = _gen(prod, "SPLIT")
        assert out == baseline["SPLIT"] and cached == 0
        w = prod.stats()["worker"]
        assert w["loaded_blocks"] == 0 and w["remote_flush_timeouts"] == 0
    remote_b = _remote(b)
    with _engine(model_dir, b, workdir, "consumer", kv_role="kv_consumer") as cons:
        out, cached = _gen(cons, "SPLIT")
        assert out == baseline["SPLIT"] and cached == 2 * BLOCK
        # A consumer stores nothing, not even a prompt it computed itself.
        out, cached = _gen(cons, "OTHER")
        assert out == baseline["OTHER"] and cached == 0
        w = cons.stats()["worker"]
        assert w["loaded_blocks"] == 2 and w["load_failed_blocks"] == 0
        assert w["stored_blocks"] == 0
    after = _remote(b)
    assert after.hits - remote_b.hits == 2
    assert after.bytes_in == remote_b.bytes_in          # nothing of B's went to the cluster
