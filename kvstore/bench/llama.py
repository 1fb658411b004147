"""Llama-architecture models with seeded random weights, built in seconds (no download).

The weights are tiles of one seeded normal pool (std 0.02, shifted per tensor), norms are 1:
numerically a plausible network (finite activations), and every run gets the same model. Values
do not matter for timing; for exactness tests use tests/support/hf_models.py instead.
"""
from __future__ import annotations

import hashlib

import torch

# ~1B parameters: the Llama-3.2-1B block shape with a 32k vocabulary.
SHAPE_1B = dict(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, vocab=32000)
SHAPE_DEMO = dict(hidden=384, intermediate=1024, layers=6, heads=6, kv_heads=2, vocab=4096)
SHAPE_TINY = dict(hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, vocab=512)


def random_llama(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
                 vocab: int, dtype: str = "bfloat16", seed: int = 0, max_positions: int = 16384):
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.initialization import no_init_weights

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
                      tie_word_embeddings=True)
    tdtype = getattr(torch, dtype)
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
    return model.eval()


def param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())
