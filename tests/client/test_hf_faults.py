"""The cache never makes generation fail: a real daemon down, restarted, paused or refusing."""
from __future__ import annotations

import logging
import os
import signal
import time

import pytest
import torch

from support.hf_models import prompt, tiny_llama
from kvstore.client import KVClient
from kvstore.client.hf import HFPrefixCache, layout_for
from kvstore.client.hf.cache import LayerLoader, LoadTimeline, PrefixLoadFailed

GEN = dict(max_new_tokens=4, do_sample=False)


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=0)


@pytest.fixture(scope="module")
def ids():
    return prompt(40, seed=9)


@pytest.fixture(scope="module")
def expected(model, ids):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), **GEN)


def _gen(kv, ids):
    with torch.no_grad():
        out = kv.generate(ids, **GEN)
    kv.flush()
    return out


def test_daemon_down_then_started(daemon_factory, tmp_path, model, ids, expected, caplog):
    wd = tmp_path / "late"
    wd.mkdir()
    with caplog.at_level(logging.WARNING, "kvstore.client.hf"):
        kv = HFPrefixCache(model, "tiny", socket=str(wd / "kv.sock"), block_tokens=8,
                           deadline_s=1.0)
        try:
            t = time.monotonic()
            assert torch.equal(_gen(kv, ids), expected)
            assert time.monotonic() - t < 5
            assert kv.last.fallback == "unavailable" and kv.stats["fallbacks"] == 1
            assert "recomputing the whole prompt" in caplog.text
            daemon_factory("--dram-bytes", "64MiB", "--chunk-bytes", "16MiB", workdir=wd)
            assert torch.equal(_gen(kv, ids), expected)      # connects, misses, stores
            assert kv.last.fallback == "" and kv.last.blocks_stored == 5
            assert torch.equal(_gen(kv, ids), expected)
            assert kv.last.reused_tokens == 32
        finally:
            kv.close()


def test_daemon_restarted_between_requests(daemon_factory, tmp_path, model, ids, expected):
    wd = tmp_path / "d"
    wd.mkdir()
    d = daemon_factory("--dram-bytes", "64MiB", "--chunk-bytes", "16MiB", workdir=wd)
    client = KVClient(d.socket, timeout_s=1.0)
    with HFPrefixCache(model, "tiny", client=client, block_tokens=8) as kv:
        _gen(kv, ids)
        assert torch.equal(_gen(kv, ids), expected) and kv.last.reused_tokens == 32

        d.stop()
        assert torch.equal(_gen(kv, ids), expected)
        assert kv.last.fallback == "unavailable" and kv.stats["fallbacks"] == 1

        daemon_factory("--dram-bytes", "64MiB", "--chunk-bytes", "16MiB", workdir=wd)
        assert torch.equal(_gen(kv, ids), expected)
        assert kv.last.fallback == "" and kv.last.blocks_found == 0   # a new, empty daemon
        assert client.reconnects >= 1
        assert torch.equal(_gen(kv, ids), expected)
        assert kv.last.reused_tokens == 32
    client.close()


def test_fallbacks_while_the_daemon_was_down_are_reported_once_it_is_back(
        daemon_factory, tmp_path, model, ids, expected):
    """The daemon's recompute_fallbacks counts what its clients recomputed, the requests made
    while it was away included: the adapter keeps them and reports them when it answers."""
    wd = tmp_path / "d"
    wd.mkdir()
    d = daemon_factory("--dram-bytes", "64MiB", "--chunk-bytes", "16MiB", workdir=wd)
    with HFPrefixCache(model, "tiny", socket=d.socket, block_tokens=8, deadline_s=1.0) as kv:
        assert torch.equal(_gen(kv, ids), expected)
        d.stop()
        for _ in range(2):
            assert torch.equal(_gen(kv, ids), expected)
            assert kv.last.fallback == "unavailable"
        d2 = daemon_factory("--dram-bytes", "64MiB", "--chunk-bytes", "16MiB", workdir=wd)
        assert torch.equal(_gen(kv, ids), expected)
        assert kv.last.fallback == ""                    # a new, empty daemon: a plain miss
        with KVClient(d2.socket, shared_memory=False) as c:
            deadline = time.monotonic() + 10
            while c.stats().recompute_fallbacks < 2:     # sent on a thread of its own
                assert time.monotonic() < deadline, "the fallbacks were never reported"
                time.sleep(0.05)
            st = c.stats()
            assert st.recompute_fallbacks == 2
            assert st.recompute_fallback_blocks == 2 * (ids.shape[-1] // 8)


def test_paused_daemon_hits_the_deadline(daemon, model, ids, expected):
    with HFPrefixCache(model, "tiny", socket=daemon.socket, block_tokens=8,
                       deadline_s=0.5, cooldown_s=0) as kv:
        _gen(kv, ids)
        os.kill(daemon.proc.pid, signal.SIGSTOP)
        try:
            t = time.monotonic()
            with torch.no_grad():
                out = kv.generate(ids, **GEN)
            took = time.monotonic() - t
        finally:
            os.kill(daemon.proc.pid, signal.SIGCONT)
        assert torch.equal(out, expected)
        assert kv.last.fallback == "deadline" and took < 3
        kv.flush()
        assert torch.equal(_gen(kv, ids), expected)
        assert kv.last.reused_tokens == 32 and kv.last.fallback == ""


def test_hung_daemon_is_skipped_for_a_cooldown(daemon, model, ids, expected):
    with HFPrefixCache(model, "tiny", socket=daemon.socket, block_tokens=8,
                       deadline_s=2.0, cooldown_s=60) as kv:
        _gen(kv, ids)
        os.kill(daemon.proc.pid, signal.SIGSTOP)
        try:
            with torch.no_grad():
                kv.generate(ids, **GEN)
                assert kv.last.fallback == "deadline"
                t = time.monotonic()
                out = kv.generate(ids, **GEN)
                took = time.monotonic() - t
        finally:
            os.kill(daemon.proc.pid, signal.SIGCONT)
        assert torch.equal(out, expected)
        assert kv.last.fallback == "cooldown" and took < 1.5   # no second 2 s wait on the daemon
        assert kv.stats["fallbacks"] == 2


def test_daemon_error_degrades_to_recompute(daemon_factory, tmp_path, model, ids, expected):
    """After a restart another worker claims the model id with another layout: refused."""
    wd = tmp_path / "e"
    wd.mkdir()
    d = daemon_factory("--dram-bytes", "64MiB", "--chunk-bytes", "16MiB", workdir=wd)
    with HFPrefixCache(model, "tiny", socket=d.socket, block_tokens=8, fingerprint=False) as kv:
        _gen(kv, ids)
        d.stop()
        daemon_factory("--dram-bytes", "64MiB", "--chunk-bytes", "16MiB", workdir=wd)
        with KVClient(d.socket) as other:
            other.namespace("tiny", layout_for(tiny_llama(seed=0, kv_heads=1), 8))
            assert torch.equal(_gen(kv, ids), expected)
            assert kv.last.fallback == "error"
            assert kv.stats["store_failures"] >= 1        # its store is refused too


def test_expired_lease_is_never_used(daemon_factory):
    """A lease that expired before release poisons the load: the forward must not finish."""
    d = daemon_factory("--dram-bytes", "64MiB", "--chunk-bytes", "16MiB",
                       "--lease-timeout-s", "0.05")
    layout = layout_for(tiny_llama(seed=0), 8)
    with KVClient(d.socket) as client:
        ns = client.namespace("tiny", layout)
        keys = ns.block_keys(list(range(32)))
        ns.put(keys, torch.randn(4, *layout.block_shape)).result()
        lease = ns.acquire(keys)
        time.sleep(1.5)                              # the daemon's expiry sweep runs each 1 s
        loader = LayerLoader(lease.views(), lease.offsets, layout, 4, lease.release,
                             LoadTimeline()).start()
        loader.wait(0)                               # early layers may be consumed ...
        with pytest.raises(PrefixLoadFailed, match="expired"):
            loader.wait(layout.num_layers - 1)       # ... but the forward can never complete
