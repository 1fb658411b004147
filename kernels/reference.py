"""Torch reference kernels: they run on any device and define the expected results.

The Triton kernels (``triton_kv``) must match these bit for bit: copies are exact, and
quantization uses the same float32 operations in the same order (``x * (QMAX / amax)``, clamp,
round half away from zero for int8, round to nearest even for fp8).

All functions take an already validated ``PagedKV`` and int64 page table (see ``ops``).
"""
from __future__ import annotations

import torch

from kvstore.kernels.paged import PagedKV
from kvstore.kernels.quant import QMAX, QuantizedBlocks, qdtype


def _rows(pkv: PagedKV, page_table: torch.Tensor, all_layers: bool) -> torch.Tensor:
    """Page-row ids in kvstore block order, for a cache viewed as rows of P*H*D elements.

    A contiguous layer is [2 * pages] rows: ids ordered (block, k|v, page-of-block). A contiguous
    layer-first cache is [L * 2 * pages] rows: ids ordered (block, layer, k|v, page-of-block),
    which is exactly the row order of the [n, L, 2, B, H, D] blocks, so one index_select moves
    every layer. Whole-row copies are far faster on CPU than the general 6-D strided copy.
    """
    N = pkv.num_pages
    ids = page_table.to(pkv.device)[:, None, :] + torch.arange(2, device=pkv.device)[:, None] * N
    if all_layers:
        layer = torch.arange(pkv.num_layers, device=pkv.device)[:, None, None] * (2 * N)
        ids = ids[:, None] + layer
    return ids.reshape(-1)


def _consecutive(idx: torch.Tensor) -> slice | None:
    """The pages as a slice when they are one ascending run (a transformers cache's pages of
    consecutive tokens): one strided copy then moves them, no index gather/scatter."""
    if idx.numel() == 0 or idx.device.type != "cpu":
        return None
    a = int(idx[0])
    if int(idx[-1]) - a != idx.numel() - 1 or not torch.equal(
            idx, torch.arange(a, a + idx.numel(), dtype=idx.dtype)):
        return None
    return slice(a, a + idx.numel())


def _page_runs(idx: torch.Tensor) -> list[tuple[int, int, int]]:
    """(first index, first page, count) of each run of consecutive pages in ``idx``."""
    runs: list[tuple[int, int, int]] = []
    for i, page in enumerate(idx.tolist()):
        if runs and page == runs[-1][1] + runs[-1][2]:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((i, page, 1))
    return runs


def _row_path(pkv: PagedKV) -> str:
    if pkv.split:
        return "split"
    if pkv.layer_first is not None and pkv.layer_first.is_contiguous():
        return "layer_first"
    return "per_layer" if all(t.is_contiguous() for t in pkv.layers) else "strided"


def gather(pkv: PagedKV, page_table: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[b, l, c, t] = layers[l][c, page_table[b, t // P], t % P] for every block b."""
    n, ppb = page_table.shape
    if n == 0:
        return out
    path = _row_path(pkv)
    if path == "layer_first":
        src = pkv.layer_first.view(-1, pkv.layers[0][0, 0].numel())
        torch.index_select(src, 0, _rows(pkv, page_table, True), out=out.view(-1, src.shape[1]))
        return out
    if path == "per_layer":
        rows = _rows(pkv, page_table, False)
        flat = out.view(n, pkv.num_layers, -1)
        tmp = torch.empty((rows.numel(), pkv.layers[0][0, 0].numel()), dtype=out.dtype,
                          device=out.device)          # one scratch buffer for every layer
        for l, layer in enumerate(pkv.layers):
            torch.index_select(layer.view(2 * pkv.num_pages, -1), 0, rows, out=tmp)
            flat[:, l].copy_(tmp.view(n, -1))
        return out
    B = ppb * pkv.page_tokens
    idx = page_table.reshape(-1).to(pkv.device)
    if path == "split":
        run = _consecutive(page_table.reshape(-1))
        for l, kv in enumerate(pkv.split):
            for c, half in enumerate(kv):                  # [n*ppb, P, H, D] -> [n, B, H, D]
                dst = out[:, l, c].view(n, ppb, pkv.page_tokens, pkv.num_kv_heads,
                                        pkv.head_dim)
                src = half[run] if run is not None else half.index_select(0, idx)
                dst.copy_(src.view(dst.shape) if run is None else src.reshape(dst.shape))
        return out
    P, H, D = pkv.page_tokens, pkv.num_kv_heads, pkv.head_dim
    for l, layer in enumerate(pkv.layers):
        # pages first (an engine's strided pages, e.g. vLLM's, keep a page's K and V close):
        # [n*ppb, 2, P, H, D], contiguous; measured ~3x faster on CPU than selecting along
        # dim 1 and copying through a transpose
        pages = layer.transpose(0, 1).index_select(0, idx)
        if ppb == 1:
            out[:, l].copy_(pages)
        else:
            out[:, l].view(n, 2, ppb, P, H, D).copy_(
                pages.view(n, ppb, 2, P, H, D).transpose(1, 2))
    return out


def wide_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` with its contiguous last dim viewed as 8-byte elements, when its size and the
    other strides allow (same bytes, a quarter of a bf16 tensor's elements); else ``t``."""
    if t.dtype.itemsize >= 8 or t.stride(-1) != 1 or (t.shape[-1] * t.dtype.itemsize) % 8:
        return t
    try:
        return t.view(torch.int64)
    except RuntimeError:        # a stride or offset not a multiple of 8 bytes
        return t


def scatter(pkv: PagedKV, page_table: torch.Tensor, blocks: torch.Tensor) -> None:
    """The inverse of gather: layers[l][c, page_table[b, t // P], t % P] = blocks[b, l, c, t]."""
    n, ppb = page_table.shape
    if n == 0:
        return
    path = _row_path(pkv)
    row = pkv.page_tokens * pkv.num_kv_heads * pkv.head_dim
    if path == "layer_first":
        pkv.layer_first.view(-1, row).index_copy_(0, _rows(pkv, page_table, True),
                                                  blocks.view(-1, row))
        return
    if path == "per_layer":
        rows = _rows(pkv, page_table, False)
        flat = blocks.view(n, pkv.num_layers, -1)
        tmp = torch.empty((n, flat.shape[2]), dtype=blocks.dtype, device=blocks.device)
        for l, layer in enumerate(pkv.layers):
            tmp.copy_(flat[:, l])
            layer.view(2 * pkv.num_pages, -1).index_copy_(0, rows, tmp.view(rows.numel(), -1))
        return
    idx = page_table.reshape(-1).to(pkv.device)
    if path == "split":
        run = _consecutive(page_table.reshape(-1))
        shape = (n * ppb, pkv.page_tokens, pkv.num_kv_heads, pkv.head_dim)
        for l, kv in enumerate(pkv.split):
            for c, half in enumerate(kv):
                if run is not None:
                    half[run].view(n, ppb, *shape[1:]).copy_(
                        blocks[:, l, c].view(n, ppb, *shape[1:]))
                else:
                    half.index_copy_(0, idx, blocks[:, l, c].reshape(shape))
        return
    P, H, D = pkv.page_tokens, pkv.num_kv_heads, pkv.head_dim
    runs = _page_runs(idx) if idx.device.type == "cpu" else None
    for l, layer in enumerate(pkv.layers):
        # pages first, as in gather: [n*ppb, 2, P, H, D] (a view when a block is one page)
        src = blocks[:, l].reshape(n, 2, ppb, P, H, D).transpose(1, 2).reshape(n * ppb, 2, P, H, D)
        dst = layer.transpose(0, 1)
        if runs is None:
            dst.index_copy_(0, idx, src)
            continue
        # On CPU, index_copy_ into these strided pages copies element by element; a copy_ per
        # run of consecutive pages moves head_dim-long rows at a time: measured ~7x faster for
        # vLLM's CPU pages (16 blocks of the small shape: ~47 -> ~6 ms on one thread). As
        # 8-byte elements where the rows allow: 1.1x faster again on one thread, 1.5x on two
        # (128 blocks of the small and 1B shapes: 3.8 -> 2.5 ms, 8.4 -> 5.4 ms).
        wdst, wsrc = wide_rows(dst), wide_rows(src)
        if wdst.dtype == wsrc.dtype:
            dst, src = wdst, wsrc
        for i, page, count in runs:
            dst[page:page + count].copy_(src[i:i + count])


def quantize(blocks: torch.Tensor, name: str) -> QuantizedBlocks:
    """Quantize [n, L, 2, B, H, D] blocks with one scale per (block, layer, k|v)."""
    dt, qmax = qdtype(name), QMAX[name]
    x = blocks.float()
    amax = x.abs().amax(dim=(3, 4, 5))
    scales = amax / qmax
    # a true division: `qmax / amax` would be torch's reciprocal() * qmax, two roundings where
    # the Triton kernel does one (div_rn), and exact ties would then round differently
    inv = torch.where(amax > 0, torch.full_like(amax, qmax).div(amax), torch.zeros_like(amax))
    y = (x * inv[..., None, None, None]).clamp(-qmax, qmax)
    if name == "int8":
        q = (torch.sign(y) * torch.floor(y.abs() + 0.5)).to(dt)
    else:
        q = y.to(dt)
    return QuantizedBlocks(q, scales)


def dequantize(q: QuantizedBlocks, dtype: torch.dtype) -> torch.Tensor:
    return (q.data.float() * q.scales[..., None, None, None]).to(dtype)
