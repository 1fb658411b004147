"""Block layout <-> transformers cache layout, through a real daemon's arena."""
from __future__ import annotations

import pytest
import torch

from kvstore.client import KVClient, KVLayout
from kvstore.client.hf.cache import LayerLoader, LoadTimeline, pack_blocks
from kvstore.client.transfer import strided_runs


@pytest.mark.parametrize("offsets,expect", [
    ([], []),
    ([4096], [(0, 1, 0)]),
    ([0, 8192, 16384], [(0, 3, 8192)]),
    ([0, 8192, 12288, 20480], [(0, 2, 8192), (2, 2, 8192)]),
    ([16384, 0, 8192], [(0, 1, 0), (1, 2, 8192)]),
])
def test_runs(offsets, expect):
    assert strided_runs(offsets) == expect


def test_loader_reads_scattered_slots_exactly(daemon):
    """Blocks interleaved with another namespace's land in irregular slots; every byte still
    arrives in the right place, and the suffix room is left free."""
    layout = KVLayout(3, 2, 8, block_tokens=4, dtype="float32")
    H, D, n = 2, 8, 6
    layers = [(torch.randn(1, H, n * 4, D), torch.randn(1, H, n * 4, D)) for _ in range(3)]
    kv = pack_blocks(layers, layout, 0, n)
    with KVClient(daemon.socket) as client:
        a = client.namespace("a", layout)
        b = client.namespace("b", layout)
        keys = a.block_keys(list(range(n * 4)))
        other = b.block_keys(list(range(n * 4)))
        bi = 0
        for j in range(n):
            if j in (1, 3, 4):  # another namespace's block takes the next slot
                b.put([other[bi]], torch.zeros(1, *layout.block_shape),
                      parent_key=other[bi - 1] if bi else None).result()
                bi += 1
            a.put([keys[j]], kv[j:j + 1], parent_key=keys[j - 1] if j else None).result()
        with a.acquire(keys) as lease:
            assert len(lease) == n
            assert len(strided_runs(lease.offsets)) > 1            # really scattered
            loader = LayerLoader(lease.views(), lease.offsets, layout, n, lambda: None,
                                 LoadTimeline(), extra_tokens=3).start()
            for i, (k, v) in enumerate(layers):
                got_k, got_v = loader.wait(i)
                assert got_k.shape == (1, H, n * 4 + 3, D)
                assert torch.equal(got_k[..., :n * 4, :], k)
                assert torch.equal(got_v[..., :n * 4, :], v)
            loader.join()
