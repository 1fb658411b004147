"""Tiny Llama-architecture models with seeded random weights (no downloads), for HF tests: the
benchmarks' builder (kvstore.bench.llama.random_llama) at test sizes."""
from __future__ import annotations

import torch

from kvstore.bench.llama import random_llama


def tiny_llama(seed: int = 0, *, layers: int = 3, heads: int = 4, kv_heads: int = 2,
               hidden: int = 64, vocab: int = 512, dtype=torch.float32):
    # Random weights give near-uniform logits, where greedy ties would make token comparisons
    # meaningless; a sharper head makes each argmax a clear decision.
    return random_llama(hidden=hidden, intermediate=2 * hidden, layers=layers, heads=heads,
                        kv_heads=kv_heads, vocab=vocab, dtype=dtype, seed=seed,
                        max_positions=1024, tie_embeddings=False, head_scale=8.0)


def prompt(n: int, seed: int = 1, vocab: int = 512) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, n), generator=g)
