"""Restored KV is exact: generations with cached prefixes equal a full recompute.

Two comparisons per case, both against a real daemon:
- against the same model generating from an in-memory DynamicCache holding the very KV the cold
  run computed: logits must be *bitwise* equal — the trip through the daemon changes no bit;
- against a full recompute: greedy tokens equal, logits within 1e-4 (float32). Not bitwise,
  because computing the suffix as a separate forward changes the query length of every matmul
  and attention kernel, and CPU kernels block (hence sum) differently for different lengths;
  the observed differences are a few float32 ulps (~1e-7 on logits of magnitude ~10).
"""
from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from support.hf_models import prompt, tiny_llama
from kvstore.client import KVClient
from kvstore.client.hf import HFPrefixCache, LayoutMismatch, layout_for

@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    """One real daemon for the whole module (each test uses its own model ids): on a busy
    2-core machine, daemon start-up would otherwise dominate these tests."""
    from kvstore.testing.daemon import DaemonProcess
    shm = Path("/dev/shm") / f"kvstore-test-{uuid.uuid4().hex[:10]}"
    shm.mkdir()
    d = DaemonProcess(tmp_path_factory.mktemp("hf-exact"), shm,
                      ["--dram-bytes", "256MiB", "--chunk-bytes", "16MiB"]).start()
    yield d
    d.close()
    shutil.rmtree(shm, ignore_errors=True)


GEN = dict(max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)


def _full(model, ids):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), **GEN)


def _from_memory(model, ids, reused: int):
    """HF's own prefix reuse: the cold prefill's KV, cropped to ``reused`` tokens."""
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(ids, past_key_values=cache, attention_mask=torch.ones_like(ids))
        cache.crop(-(ids.shape[1] - reused))
        return model.generate(ids, past_key_values=cache, attention_mask=torch.ones_like(ids),
                              **GEN)


def _check(kv: HFPrefixCache, model, ids, expect_reused: int, tol: float = 1e-4):
    full = _full(model, ids)
    with torch.no_grad():
        cold = kv.generate(ids, **GEN)
    kv.flush()
    assert torch.equal(cold.sequences, full.sequences)
    with torch.no_grad():
        warm = kv.generate(ids, **GEN)
    assert kv.last.reused_tokens == expect_reused, kv.last
    assert kv.last.fallback == ""
    assert torch.equal(warm.sequences, full.sequences)
    mem = _from_memory(model, ids, expect_reused)
    for w, m, f in zip(warm.logits, mem.logits, full.logits):
        assert torch.equal(w, m)                              # the daemon changed no bit
        assert (w - f).abs().max().item() <= tol * max(1.0, f.abs().max().item())


@pytest.mark.parametrize("block_tokens,n_tokens,expect_reused", [
    (4, 37, 36),    # mid-block: every full block is reused
    (8, 45, 40),
    (16, 64, 48),   # ends on a block boundary: the last block is recomputed for its logits
    (16, 70, 64),
])
def test_cached_generation_equals_recompute_gqa(daemon, block_tokens, n_tokens, expect_reused):
    model = tiny_llama(seed=0, heads=4, kv_heads=2)
    with HFPrefixCache(model, f"tiny-gqa-{block_tokens}-{n_tokens}", socket=daemon.socket,
                       block_tokens=block_tokens) as kv:
        _check(kv, model, prompt(n_tokens), expect_reused)


def test_remote_client_streams_the_prefix(daemon):
    model = tiny_llama(seed=4)
    client = KVClient(daemon.socket, shared_memory=False, timeout_s=30)  # as if across hosts
    assert not client.shared_memory
    with HFPrefixCache(model, "tiny-remote", client=client, block_tokens=8) as kv:
        _check(kv, model, prompt(45, seed=8), 40)
    client.close()


@pytest.mark.parametrize("layerwise", [True, False])
def test_mha_and_whole_prefix_loading(daemon, layerwise):
    model = tiny_llama(seed=3, heads=4, kv_heads=4, layers=4)
    with HFPrefixCache(model, f"tiny-mha-{layerwise}", socket=daemon.socket, block_tokens=8,
                       layerwise=layerwise) as kv:
        _check(kv, model, prompt(50, seed=7), 48)
        tl = kv.last.timeline
        assert len(tl.loaded_s) == len(tl.needed_s) == 4


def test_bf16_tokens_equal_and_daemon_bit_exact(daemon):
    model = tiny_llama(seed=5, dtype=torch.bfloat16)
    with HFPrefixCache(model, "tiny-bf16", socket=daemon.socket, block_tokens=16) as kv:
        assert kv.layout.dtype == "bfloat16"
        # bfloat16 keeps 8 mantissa bits: reassociation moves logits by ~1e-2 at most
        _check(kv, model, prompt(80, seed=2), 64, tol=2e-2)


def test_extended_prompt_reuses_shared_prefix_and_stores_only_new_blocks(daemon):
    model = tiny_llama(seed=0)
    doc = prompt(64, seed=11)
    q1 = torch.cat([doc, prompt(10, seed=12)], dim=1)
    q2 = torch.cat([doc, prompt(21, seed=13)], dim=1)
    with HFPrefixCache(model, "tiny-extend", socket=daemon.socket, block_tokens=16) as kv:
        with torch.no_grad():
            kv.generate(q1, **GEN)
            kv.flush()
            assert kv.last.blocks_stored == 4
            out = kv.generate(q2, **GEN)
        assert kv.last.reused_tokens == 64 and kv.last.blocks_found == 4
        assert kv.last.blocks_stored == 1           # only the one new full block
        assert torch.equal(out.sequences, _full(model, q2).sequences)
        assert kv.hit_rate == pytest.approx(64 / (74 + 85))


@pytest.mark.parametrize("kw", [dict(num_beams=2, num_return_sequences=2, do_sample=False),
                                dict(do_sample=True, top_k=5, num_return_sequences=2)])
def test_beams_and_samples_share_the_cached_prefix(daemon, kw):
    model = tiny_llama(seed=0)
    ids = prompt(45, seed=3)
    name = "tiny-beam" if "num_beams" in kw else "tiny-sample"
    with HFPrefixCache(model, name, socket=daemon.socket, block_tokens=8) as kv:
        with torch.no_grad():
            kv.generate(ids, max_new_tokens=4, **kw)
            kv.flush()
            torch.manual_seed(0)
            out = kv.generate(ids, max_new_tokens=4, **kw)
            assert kv.last.reused_tokens == 40 and kv.stats["fallbacks"] == 0
            torch.manual_seed(0)
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, **kw)
        assert torch.equal(out, ref)


def test_two_models_share_one_daemon_without_mixing(daemon):
    a = tiny_llama(seed=0)
    b = tiny_llama(seed=1)                       # same config, other weights
    c = tiny_llama(seed=2, layers=2, kv_heads=1)  # other layout
    ids = prompt(40, seed=4)
    kvs = [HFPrefixCache(m, "tiny-pair", socket=daemon.socket, block_tokens=8)
           for m in (a, b, c)]
    try:
        assert len({kv.model_id for kv in kvs}) == 3   # weights digest separates a and b
        for kv in kvs:
            with torch.no_grad():
                kv.generate(ids, **GEN)
            kv.flush()
        for kv, m in zip(kvs, (a, b, c)):
            with torch.no_grad():
                out = kv.generate(ids, **GEN)
            assert kv.last.reused_tokens == 32
            assert torch.equal(out.sequences, _full(m, ids).sequences)
    finally:
        for kv in kvs:
            kv.close()


def test_layout_mismatch_is_refused(daemon):
    model = tiny_llama(seed=0)
    with KVClient(daemon.socket) as client:
        other = layout_for(tiny_llama(seed=0, kv_heads=1), 16)
        ns = client.namespace("tiny-fixed", other)
        with pytest.raises(LayoutMismatch, match="does not match"):
            HFPrefixCache(model, namespace=ns)
        # same model id registered by another client with another layout: the daemon refuses
        with pytest.raises(LayoutMismatch, match="layout mismatch"):
            HFPrefixCache(model, "tiny-fixed", client=client, fingerprint=False)


def test_unsupported_models_are_refused_clearly():
    model = tiny_llama(seed=0)
    model.config.sliding_window = 8
    model.config.layer_types = ["sliding_attention"] * model.config.num_hidden_layers
    with pytest.raises(ValueError, match="full-attention layers only"):
        layout_for(model)


def test_exact_after_demotion_to_ssd_and_promotion_back(daemon_factory, tmp_path):
    from kvstore.bench.ttft import Demoter
    d = daemon_factory("--dram-bytes", "16MiB", "--chunk-bytes", "4MiB",
                       "--ssd-dir", str(tmp_path / "ssd"), "--ssd-bytes", "512MiB")
    model = tiny_llama(seed=0)
    ids = prompt(70, seed=21)
    with HFPrefixCache(model, "tiny", socket=d.socket, block_tokens=16) as kv:
        full = _full(model, ids)
        with torch.no_grad():
            kv.generate(ids, **GEN)
        kv.flush()
        Demoter(kv, ids)()                               # DRAM -> SSD, by eviction
        with torch.no_grad():
            warm = kv.generate(ids, **GEN)               # SSD -> DRAM, by the lease
        assert kv.last.tiers[:4] == ["SSD"] * 4 and kv.last.reused_tokens == 64
        assert torch.equal(warm.sequences, full.sequences)
        for w, m in zip(warm.logits, _from_memory(model, ids, 64).logits):
            assert torch.equal(w, m)
