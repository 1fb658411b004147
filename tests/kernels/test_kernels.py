"""The torch reference kernels against index-by-index construction, and their error handling.

Triton is checked against the reference in test_kernels_triton.py (interpreter on CPU, real
kernels on a GPU).
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.kernels import (KernelInputError, QMAX, dequantize, error_bound, gather,
                             gather_quantized, quantize, scatter, scatter_dequantized)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_cache(kind: str, L: int, N: int, P: int, H: int, D: int, dtype, seed: int = 0):
    """A cache of the given layout filled with distinct values (so misplaced copies show)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "per_layer":
        return [torch.randn(2, N, P, H, D, generator=g).to(dtype) for _ in range(L)]
    if kind == "layer_first":
        return torch.randn(L, 2, N, P, H, D, generator=g).to(dtype)
    if kind == "split":
        # (K, V) per layer, each a transformers-style [1, H, seq, D] seen as [N, P, H, D] pages
        def pages(t):
            return t.as_strided((N, P, H, D), (P * D, D, N * P * D, 1))
        return [(pages(torch.randn(1, H, N * P, D, generator=g).to(dtype)),
                 pages(torch.randn(1, H, N * P, D, generator=g).to(dtype))) for _ in range(L)]
    # "hnd": heads stored before tokens (non-dense token rows); same logical shape
    return torch.randn(L, 2, N, H, P, D, generator=g).to(dtype).transpose(3, 4)


def layers_of(cache):
    if isinstance(cache, list) and isinstance(cache[0], tuple):     # split: as [2, N, P, H, D]
        return [torch.stack(pair) for pair in cache]
    return list(cache) if isinstance(cache, list) else list(cache.unbind(0))


def expected_gather(cache, page_table):
    layers = layers_of(cache)
    n, ppb = page_table.shape
    P, H, D = layers[0].shape[2:]
    out = torch.empty(n, len(layers), 2, ppb * P, H, D, dtype=layers[0].dtype)
    for b in range(n):
        for l, layer in enumerate(layers):
            for c in range(2):
                for t in range(ppb * P):
                    out[b, l, c, t] = layer[c, int(page_table[b, t // P]), t % P]
    return out


cache_params = st.fixed_dictionaries({
    "kind": st.sampled_from(["per_layer", "layer_first", "hnd", "split"]),
    "L": st.integers(1, 3), "P": st.sampled_from([1, 2, 4]), "H": st.integers(1, 3),
    "D": st.sampled_from([1, 4, 8]), "dtype": st.sampled_from(DTYPES),
    "ppb": st.integers(1, 3), "n": st.integers(0, 4), "seed": st.integers(0, 2 ** 16),
})


@settings(max_examples=40, deadline=None)
@given(p=cache_params, data=st.data())
def test_gather_matches_index_by_index(p, data):
    N = p["n"] * p["ppb"] + 2
    cache = make_cache(p["kind"], p["L"], N, p["P"], p["H"], p["D"], p["dtype"], p["seed"])
    ids = data.draw(st.lists(st.integers(0, N - 1), min_size=p["n"] * p["ppb"],
                             max_size=p["n"] * p["ppb"]))       # repeats allowed for gather
    pt = torch.tensor(ids, dtype=torch.int64).reshape(p["n"], p["ppb"])
    assert torch.equal(gather(cache, pt), expected_gather(cache, pt))


@settings(max_examples=40, deadline=None)
@given(p=cache_params, data=st.data())
def test_scatter_matches_index_by_index(p, data):
    N = p["n"] * p["ppb"] + 2
    cache = make_cache(p["kind"], p["L"], N, p["P"], p["H"], p["D"], p["dtype"], p["seed"])
    ids = data.draw(st.permutations(range(N)))[: p["n"] * p["ppb"]]
    pt = torch.tensor(ids, dtype=torch.int64).reshape(p["n"], p["ppb"])
    blocks = torch.randn(p["n"], p["L"], 2, p["ppb"] * p["P"], p["H"], p["D"]).to(p["dtype"])
    want = [t.clone() for t in layers_of(cache)]
    for b in range(p["n"]):
        for l in range(p["L"]):
            for c in range(2):
                for t in range(p["ppb"] * p["P"]):
                    want[l][c, int(pt[b, t // p["P"]]), t % p["P"]] = blocks[b, l, c, t]
    scatter(cache, pt, blocks)
    for got, exp in zip(layers_of(cache), want):
        assert torch.equal(got, exp)            # the named pages changed, no other page did


def test_scatter_then_gather_round_trips_across_page_sizes():
    # block_tokens 16 from pages of 4: blocks move to other pages and come back unchanged
    cache = make_cache("per_layer", 4, 20, 4, 2, 16, torch.bfloat16)
    src = torch.arange(8).reshape(2, 4)
    dst = torch.tensor([[19, 3, 11, 8], [0, 17, 12, 9]])
    blocks = gather(cache, src)
    scatter(cache, dst, blocks)
    assert torch.equal(gather(cache, dst), blocks)
    assert blocks.shape == (2, 4, 2, 16, 2, 16)


def test_gather_into_caller_buffer():
    cache = make_cache("layer_first", 2, 6, 2, 2, 4, torch.float32)
    pt = torch.tensor([[5, 1]])
    out = torch.full((1, 2, 2, 4, 2, 4), -1.0)
    assert gather(cache, pt, out=out) is out
    assert torch.equal(out, expected_gather(cache, pt))


@pytest.mark.parametrize("bad, message", [
    (torch.tensor([[0, 6]]), "page id 6 is outside"),
    (torch.tensor([[-1, 0]]), "page id -1 is outside"),
    (torch.tensor([0, 1]), "page_table must be"),
    (torch.tensor([[0.0, 1.0]]), "must hold integers"),
])
def test_bad_page_tables_are_refused(bad, message):
    cache = make_cache("per_layer", 2, 6, 2, 1, 4, torch.float32)
    with pytest.raises(KernelInputError, match=message):
        gather(cache, bad)


def test_scatter_refuses_a_page_named_twice():
    cache = make_cache("per_layer", 2, 6, 2, 1, 4, torch.float32)
    before = [t.clone() for t in cache]
    with pytest.raises(KernelInputError, match="names a page twice"):
        scatter(cache, torch.tensor([[1, 2], [2, 3]]), torch.zeros(2, 2, 2, 4, 1, 4))
    assert all(torch.equal(a, b) for a, b in zip(cache, before))


def test_mismatched_inputs_are_refused(monkeypatch):
    cache = make_cache("per_layer", 2, 6, 2, 1, 4, torch.float32)
    pt = torch.tensor([[0, 1]])
    with pytest.raises(KernelInputError, match="layer 1"):
        gather([cache[0], cache[1].to(torch.float16)], pt)
    with pytest.raises(KernelInputError, match="layer-first cache"):
        gather(torch.zeros(2, 3, 4, 5, 6), pt)
    with pytest.raises(KernelInputError, match="shape"):
        scatter(cache, pt, torch.zeros(1, 2, 2, 2, 1, 4))      # block of 2 tokens, pages say 4
    with pytest.raises(KernelInputError, match="dtype"):
        scatter(cache, pt, torch.zeros(1, 2, 2, 4, 1, 4, dtype=torch.float16))
    with pytest.raises(KernelInputError, match="contiguous"):
        gather(cache, pt, out=torch.zeros(1, 2, 2, 4, 1, 8)[..., ::2])
    with pytest.raises(KernelInputError, match="head_dim must be the contiguous"):
        gather([t.transpose(3, 4) for t in make_cache("per_layer", 2, 6, 2, 3, 3, torch.float32)], pt)
    with pytest.raises(KernelInputError, match="impl"):
        gather(cache, pt, impl="cuda")
    split = make_cache("split", 2, 6, 2, 1, 4, torch.float32)
    with pytest.raises(KernelInputError, match="split K/V"):
        gather(split, pt, impl="triton")
    with pytest.raises(KernelInputError, match="layer 1 V"):
        gather([split[0], (split[1][0], split[1][1].half())], pt)
    with pytest.raises(KernelInputError, match="pairs"):
        gather([split[0], (split[1][0],)], pt)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if not torch.cuda.is_available():
        with pytest.raises(KernelInputError, match="TRITON_INTERPRET=1"):
            gather(cache, pt, impl="triton")


# -- quantization ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(QMAX))
@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=10, deadline=None)
@given(log_mag=st.floats(-6, 1.5), seed=st.integers(0, 2 ** 16))
def test_quantize_round_trip_stays_within_the_documented_bound(name, dtype, log_mag, seed):
    g = torch.Generator().manual_seed(seed)
    cache = [(torch.randn(2, 6, 4, 2, 8, generator=g) * 10 ** log_mag
              * torch.rand(2, 6, 1, 1, 1, generator=g)).to(dtype) for _ in range(3)]
    cache[1][1] *= 100                      # V of layer 1 far larger than its K: separate scales
    pt = torch.tensor([[0, 3], [5, 1]])
    x = gather(cache, pt)
    q = gather_quantized(cache, pt, name)
    assert q.data.dtype == getattr(torch, name) and q.scales.shape == (2, 3, 2)
    assert torch.equal(q.scales, x.float().abs().amax(dim=(3, 4, 5)) / QMAX[name])
    back = dequantize(q, dtype)
    err = (back.double() - x.double()).abs()
    assert (err <= error_bound(x, q.scales, name, dtype)).all()
    # scatter_dequantized is dequantize + scatter
    out = [torch.zeros_like(t) for t in cache]
    scatter_dequantized(out, pt, q)
    assert torch.equal(gather(out, pt), back)


def test_int8_rounds_half_away_from_zero_and_zero_slabs_stay_zero():
    blocks = torch.zeros(1, 1, 2, 4, 1, 1)
    blocks[0, 0, 0, :, 0, 0] = torch.tensor([127.0, 63.5, -63.5, 0.49])
    q = quantize(blocks, "int8")
    assert q.data[0, 0, 0, :, 0, 0].tolist() == [127, 64, -64, 0]
    assert q.scales.tolist() == [[[1.0, 0.0]]]             # the all-zero V slab: scale 0
    assert torch.equal(dequantize(q, torch.float32)[0, 0, 1], torch.zeros(4, 1, 1))


def test_quantized_payload_is_half_of_bfloat16():
    cache = make_cache("layer_first", 4, 8, 16, 8, 128, torch.bfloat16)
    pt = torch.arange(4).reshape(4, 1)
    q = gather_quantized(cache, pt, "int8")
    raw = gather(cache, pt)
    assert q.nbytes / (raw.numel() * raw.element_size()) < 0.501


def test_quantize_refuses_bad_inputs():
    cache = make_cache("per_layer", 1, 4, 2, 1, 4, torch.float32)
    with pytest.raises(KernelInputError, match="quantized dtype"):
        gather_quantized(cache, torch.tensor([[0]]), "int4")
    with pytest.raises(KernelInputError, match="16/32-bit float"):
        gather_quantized([torch.zeros(2, 4, 2, 1, 4, dtype=torch.int8)], torch.tensor([[0]]))
    q = gather_quantized(cache, torch.tensor([[0]]))
    with pytest.raises(KernelInputError, match="scales"):
        scatter_dequantized(cache, torch.tensor([[1]]),
                            type(q)(q.data, q.scales.double()))
