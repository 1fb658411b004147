"""vLLM page formats <-> kvstore's canonical block layout (torch only; no vLLM needed)."""
from __future__ import annotations

import pytest
import torch

from kvstore.kernels.pages import page_format_for
from kvstore.core.layout import KVLayout

LAYOUT = KVLayout(num_layers=3, num_kv_heads=2, head_dim=32, block_tokens=32, dtype="bfloat16")
B = 6


def _cpu_pages(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """CPU_ATTN as vLLM writes it: per (block, head) the N keys then the N values.

    k, v: [B, N, H, D] -> [B, H, N, 2D] (the [N, 2D] interior viewed as [2N, D] holds K; V)."""
    page = torch.cat([k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)], dim=2)  # [B, H, 2N, D]
    return page.reshape(B, LAYOUT.num_kv_heads, LAYOUT.block_tokens, 2 * LAYOUT.head_dim)


def _flash_pages(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """FLASH_ATTN: each token's C is [K, V]; [B, N, H, 2D] stored as a [B, H, N, 2D] view."""
    return torch.cat([k, v], dim=-1).transpose(1, 2)


@pytest.mark.parametrize("backend,build", [("CPU_ATTN", _cpu_pages), ("FLASH_ATTN", _flash_pages)])
def test_gather_gives_canonical_blocks_and_scatter_inverts_it(backend, build):
    g = torch.Generator().manual_seed(0)
    shape = (B, LAYOUT.block_tokens, LAYOUT.num_kv_heads, LAYOUT.head_dim)
    kvs = [(torch.randn(shape, generator=g).bfloat16(), torch.randn(shape, generator=g).bfloat16())
           for _ in range(LAYOUT.num_layers)]
    fmt = page_format_for(backend, LAYOUT)
    layers = [fmt.canonical(build(k, v)) for k, v in kvs]

    ids = [4, 1]
    got = fmt.gather(layers, ids)
    assert tuple(got.shape) == (2, *LAYOUT.block_shape)
    for j, b in enumerate(ids):
        for li, (k, v) in enumerate(kvs):
            assert torch.equal(got[j, li, 0], k[b]) and torch.equal(got[j, li, 1], v[b])

    # Scatter into other blocks of a zeroed cache: exactly those blocks change, to those bytes.
    pages = [build(torch.zeros_like(k), torch.zeros_like(v)) for k, v in kvs]
    empty = [fmt.canonical(p) for p in pages]
    fmt.scatter(empty, [0, 5], got)
    assert torch.equal(fmt.gather(empty, [0, 5]), got)
    assert not fmt.gather(empty, [1, 2, 3, 4]).any()


def test_unknown_backend_is_refused_by_name():
    with pytest.raises(ValueError, match="FLASHINFER.*refusing"):
        page_format_for("FLASHINFER", LAYOUT)


def test_unexpected_page_shape_or_strides_are_refused():
    fmt = page_format_for("CPU_ATTN", LAYOUT)
    with pytest.raises(ValueError, match="expected"):   # heads and tokens swapped
        fmt.canonical(torch.zeros(B, LAYOUT.block_tokens, LAYOUT.num_kv_heads, 2 * LAYOUT.head_dim,
                                  dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="dtype"):
        fmt.canonical(torch.zeros(B, 2, 32, 64, dtype=torch.float16))
    with pytest.raises(ValueError, match="not contiguous"):
        fmt.canonical(torch.zeros(B, 2, 64, 32, dtype=torch.bfloat16).transpose(2, 3))


def _random_layers(build):
    g = torch.Generator().manual_seed(1)
    shape = (B, LAYOUT.block_tokens, LAYOUT.num_kv_heads, LAYOUT.head_dim)
    return [build(torch.randn(shape, generator=g).bfloat16(),
                  torch.randn(shape, generator=g).bfloat16()) for _ in range(LAYOUT.num_layers)]


def _arena_rows(n: int) -> torch.Tensor:
    """n blocks as an arena holds them: rows of block_bytes, viewed [n, *block_shape] with a
    row stride (a run's view of adjacent slots, here with one spare slot between rows)."""
    g = torch.Generator().manual_seed(2)
    rows = torch.randn((n, 2, LAYOUT.block_bytes // 2), generator=g).bfloat16()[:, 0]
    return rows.view(n, *LAYOUT.block_shape)


@pytest.mark.parametrize("backend,build", [("CPU_ATTN", _cpu_pages), ("FLASH_ATTN", _flash_pages)])
def test_scatter_layer_by_layer_equals_scatter_and_touches_only_its_pages(backend, build):
    fmt = page_format_for(backend, LAYOUT)
    data = _arena_rows(4)
    assert not data.is_contiguous()
    ids = [2, 3, 0, 5]                                  # a run of two, then single pages
    want_pages = _random_layers(build)
    want = [fmt.canonical(p) for p in want_pages]
    fmt.scatter(want, ids, data.contiguous())
    got_pages = _random_layers(build)                   # the same starting bytes
    got = [fmt.canonical(p) for p in got_pages]
    for l, layer in enumerate(got):
        before = [p.clone() for p in got_pages]
        fmt.scatter_layer(layer, ids, data, l)
        for m, (p, b) in enumerate(zip(got_pages, before)):
            assert torch.equal(p, b) == (m != l)        # only layer l changed
    for p, w in zip(got_pages, want_pages):
        assert torch.equal(p.view(torch.int16), w.view(torch.int16))
    assert torch.equal(fmt.gather(got, ids), data.contiguous())
    assert torch.equal(fmt.gather(got, [1, 4]), fmt.gather(
        [fmt.canonical(p) for p in _random_layers(build)], [1, 4]))   # others untouched


def test_scatter_layer_refuses_ids_and_shapes_that_do_not_fit():
    fmt = page_format_for("CPU_ATTN", LAYOUT)
    layer = fmt.canonical(_cpu_pages(*(torch.zeros(B, LAYOUT.block_tokens, LAYOUT.num_kv_heads,
                                                   LAYOUT.head_dim).bfloat16(),) * 2))
    data = _arena_rows(2)
    before = layer.clone()
    for ids in ([1, 1], [0, B], [-1, 0]):
        with pytest.raises(ValueError, match="distinct pages"):
            fmt.scatter_layer(layer, ids, data, 0)
    with pytest.raises(ValueError, match="do not fit"):
        fmt.scatter_layer(layer, [0, 1, 2], data, 0)
    assert torch.equal(layer, before)
