"""Hybrid prefill (client/hybrid.py) against a real daemon: recompute the front, load the back
from SSD, and the output equals a full recompute — with the plan followed, with the load
lagging (the meeting point moves), and with the daemon's own plan."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from kvstore.client import KVClient
from kvstore.client.hf import layout_for
from kvstore.client.hf.cache import pack_blocks
from kvstore.client.hybrid import HybridPrefill
from kvstore.planner.recompute import Plan, PrefillProfile

from support.hf_models import prompt, tiny_llama

N_BLOCKS, EXTRA = 8, 5


@pytest.fixture(scope="module")
def model():
    return tiny_llama(3)


def _store_on_ssd(daemon_factory, tmp_path, model, ids, *extra):
    """Prefill ids, store its full blocks, restart the daemon: the blocks are then on SSD."""
    layout = layout_for(model)
    args = ["--dram-bytes", "16MiB", "--chunk-bytes", "1MiB", "--ssd-dir", str(tmp_path / "ssd"),
            "--ssd-bytes", "32MiB", "--ssd-segment-bytes", "8MiB"]
    d = daemon_factory(*args)
    with torch.no_grad():
        out = model(ids, use_cache=True)
    layers = [(l.keys, l.values) for l in out.past_key_values.layers]
    with KVClient(d.socket) as c:
        ns = c.namespace("tiny", layout)
        keys = ns.block_keys(ids[0].tolist())
        ns.put(keys[:N_BLOCKS], pack_blocks(layers, layout, 0, N_BLOCKS)).result()
    d.stop()
    return daemon_factory(*args, *extra, workdir=tmp_path / "after"), layout


def _reference(model, ids):
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
        tokens = model.generate(ids, max_new_tokens=6, do_sample=False,
                                attention_mask=torch.ones_like(ids))
    return logits, tokens


def _check(model, ids, cache, ref_logits, ref_tokens):
    import copy
    gen_cache = copy.deepcopy(cache)
    with torch.no_grad():
        logits = model(ids[:, cache.get_seq_length():], past_key_values=cache).logits[0, -1]
        tokens = model.generate(ids, past_key_values=gen_cache, max_new_tokens=6,
                                do_sample=False, attention_mask=torch.ones_like(ids))
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(tokens, ref_tokens)


def test_hybrid_plan_output_equals_full_recompute(daemon_factory, tmp_path, model):
    ids = prompt(N_BLOCKS * 16 + EXTRA)
    d, layout = _store_on_ssd(daemon_factory, tmp_path, model, ids)
    ref = _reference(model, ids)
    with KVClient(d.socket) as c:
        ns = c.namespace("tiny", layout)
        hp = HybridPrefill(model, ns, PrefillProfile(), chunk_tokens=32, load_chunk_blocks=2)
        plan = Plan(3 * 16, 3, 0.0, 0.0, 0.0, 0.0, 0.0, num_cached=N_BLOCKS)
        cache, rep = hp.prefix_cache(ids, plan=plan)
        assert cache.get_seq_length() == N_BLOCKS * 16
        # Compute covers at least [0, k); the load at most [k/B, N) — more compute only if
        # the load lagged (timing on a shared machine).
        assert rep.computed_tokens >= 48 and rep.loaded_blocks <= 5 and not rep.load_failed
        assert rep.computed_tokens + 16 * rep.loaded_blocks == N_BLOCKS * 16
        _check(model, ids, cache, *ref)


def test_slow_load_moves_the_meeting_point_and_stays_exact(daemon_factory, tmp_path, model):
    ids = prompt(N_BLOCKS * 16 + EXTRA, seed=2)
    # 12 KiB blocks at 20 kB/s: 2 blocks take ~1 s; compute of 32 tokens takes milliseconds.
    d, layout = _store_on_ssd(daemon_factory, tmp_path, model, ids, "--ssd-read-limit", "20kB/s")
    ref = _reference(model, ids)
    with KVClient(d.socket) as c:
        ns = c.namespace("tiny", layout)
        hp = HybridPrefill(model, ns, PrefillProfile(), chunk_tokens=32, load_chunk_blocks=2)
        plan = Plan(0, 0, 0.0, 0.0, 0.0, 0.0, 0.0, num_cached=N_BLOCKS)   # "load everything"
        cache, rep = hp.prefix_cache(ids, plan=plan)
        assert rep.computed_tokens > 0, "compute should have gone past the planned k = 0"
        assert rep.computed_tokens + 16 * rep.loaded_blocks == N_BLOCKS * 16
        _check(model, ids, cache, *ref)


def test_daemon_planned_hybrid_is_exact(daemon_factory, tmp_path, model):
    ids = prompt(N_BLOCKS * 16 + EXTRA, seed=3)
    d, layout = _store_on_ssd(daemon_factory, tmp_path, model, ids, "--ssd-read-limit", "100kB/s")
    ref = _reference(model, ids)
    with KVClient(d.socket) as c:
        ns = c.namespace("tiny", layout)
        # A made-up profile that puts the crossover inside the prefix: ~0.1 s to recompute it.
        hp = HybridPrefill(model, ns, PrefillProfile(0.0, 1e-3, 0.0), chunk_tokens=32,
                           load_chunk_blocks=2)
        cache, rep = hp.prefix_cache(ids)
        assert rep.plan.num_cached == N_BLOCKS and rep.plan.tiers == ("SSD",) * N_BLOCKS
        assert rep.computed_tokens + 16 * rep.loaded_blocks == N_BLOCKS * 16
        _check(model, ids, cache, *ref)


def test_adapter_generate_hybrid_matches_plain_generate(daemon_factory, tmp_path, model):
    from kvstore.client.hf import HFPrefixCache

    ids = prompt(N_BLOCKS * 16 + EXTRA, seed=4)
    d, layout = _store_on_ssd(daemon_factory, tmp_path, model, ids, "--ssd-read-limit", "100kB/s")
    _, ref_tokens = _reference(model, ids)
    with KVClient(d.socket) as c:
        kv = HFPrefixCache(model, namespace=c.namespace("tiny", layout))
        out = kv.generate_hybrid(ids, PrefillProfile(0.0, 1e-3, 0.0), max_new_tokens=6,
                                 do_sample=False)
        assert torch.equal(out, ref_tokens)
        h = kv.last.hybrid
        assert h.cached_blocks == N_BLOCKS and not kv.last.fallback
        assert h.computed_tokens + 16 * h.loaded_blocks == N_BLOCKS * 16
        # The daemon gone: a plain recompute, same tokens.
        d.stop()
        out = kv.generate_hybrid(ids, PrefillProfile(0.0, 1e-3, 0.0), max_new_tokens=6,
                                 do_sample=False)
        assert torch.equal(out, ref_tokens) and kv.last.fallback
