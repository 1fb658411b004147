"""kvstore.bench.llama.random_llama: the one seeded random-weight Llama of benches, demo, tests."""
import hashlib
import subprocess
import sys

import torch

from kvstore.bench.llama import SHAPE_TINY, random_llama
from support.hf_models import tiny_llama

_DIGEST = """
import hashlib, sys, torch
from kvstore.bench.llama import SHAPE_TINY, random_llama
m = random_llama(**SHAPE_TINY, dtype="float32", seed=7)
h = hashlib.sha256()
for name, p in sorted(m.state_dict().items()):
    h.update(name.encode()); h.update(p.detach().contiguous().numpy().tobytes())
print(h.hexdigest())
"""


def _digest(model) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def test_same_seed_same_weights_in_every_process_other_seed_other_weights():
    here = _digest(random_llama(**SHAPE_TINY, dtype="float32", seed=7))
    there = subprocess.run([sys.executable, "-c", _DIGEST], capture_output=True, text=True,
                           timeout=120, check=True).stdout.strip()
    assert here == there
    assert _digest(random_llama(**SHAPE_TINY, dtype="float32", seed=8)) != here


def test_tests_models_are_the_builder_with_a_sharper_untied_head():
    m = tiny_llama(seed=3, layers=2)
    plain = random_llama(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=512,
                         dtype=torch.float32, seed=3, max_positions=1024, tie_embeddings=False)
    assert m.config.num_hidden_layers == 2 and not m.config.tie_word_embeddings
    assert torch.equal(m.lm_head.weight, plain.lm_head.weight * 8)
    assert torch.equal(m.model.embed_tokens.weight, plain.model.embed_tokens.weight)
    assert tiny_llama(seed=5, dtype=torch.bfloat16).lm_head.weight.dtype == torch.bfloat16
