"""Llama-architecture models with seeded random weights, built in seconds (no download): the
one builder of the benchmarks, the demo and the tests (tests/support/hf_models.py).

The weights are tiles of one seeded normal pool (std 0.02, shifted per tensor), norms are 1:
numerically a plausible network (finite activations), and every run (every process) with the
same seed and shape gets the same model. Values do not matter for timing; tests that compare
greedy tokens scale the output head (``head_scale``) so that each argmax is a clear decision
rather than a near-tie between almost uniform logits.
"""
from __future__ import annotations

import hashlib

import torch

# ~1B parameters: the Llama-3.2-1B block shape with a 32k vocabulary.
SHAPE_1B = dict(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, vocab=32000)
SHAPE_DEMO = dict(hidden=384, intermediate=1024, layers=6, heads=6, kv_heads=2, vocab=4096)
SHAPE_TINY = dict(hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, vocab=512)


def random_llama(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
                 vocab: int, dtype: str | torch.dtype = "bfloat16", seed: int = 0,
                 max_positions: int = 16384, tie_embeddings: bool = True,
                 head_scale: float = 1.0):
    """A LlamaForCausalLM in eval mode, its weights a function of ``seed`` and the shape only.
    ``head_scale`` multiplies the output head (needs ``tie_embeddings=False`` unless the
    input embeddings should scale with it)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.initialization import no_init_weights

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
                      tie_word_embeddings=tie_embeddings)
    tdtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    prev = torch.get_default_dtype()
    torch.set_default_dtype(tdtype)
    try:
        with no_init_weights():  # skip the (slow) default init: every weight is filled below
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    pool = torch.randn(1 << 20, generator=torch.Generator().manual_seed(seed)).mul_(0.02)
    pool = pool.to(tdtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
                continue
            shift = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=4).digest(), "little")
            src = torch.roll(pool, shift % pool.numel())
            flat = p.view(-1)
            for s in range(0, flat.numel(), src.numel()):
                e = min(flat.numel(), s + src.numel())
                flat[s:e].copy_(src[:e - s])
        if head_scale != 1.0:
            model.lm_head.weight.mul_(head_scale)
    return model.eval()


def param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())
