"""Tiny Llama-architecture models with seeded random weights (no downloads), for HF tests."""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(seed: int = 0, *, layers: int = 3, heads: int = 4, kv_heads: int = 2,
               hidden: int = 64, vocab: int = 512, dtype=torch.float32) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, max_position_embeddings=1024)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    # Random init gives near-uniform logits, where greedy ties would make token comparisons
    # meaningless; a sharper head makes each argmax a clear decision.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


def prompt(n: int, seed: int = 1, vocab: int = 512) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, n), generator=g)
