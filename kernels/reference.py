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


def _rows(pkv: PagedKV, page_table: torch.Tensor) -> torch.Tensor:
    """Row ids into a contiguous layer viewed as [2 * pages, P*H*D], ordered (block, k|v, page).

    With them one index_select / index_copy_ per layer moves whole pages in block order: far
    faster on CPU than the 6-D strided copy of the general path.
    """
    n, ppb = page_table.shape
    ids = page_table.to(pkv.device)
    return torch.stack([ids, ids + pkv.num_pages], dim=1).reshape(-1)


def gather(pkv: PagedKV, page_table: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[b, l, c, t] = layers[l][c, page_table[b, t // P], t % P] for every block b."""
    n, ppb = page_table.shape
    B = ppb * pkv.page_tokens
    if n == 0:
        return out
    if all(t.is_contiguous() for t in pkv.layers):
        rows = _rows(pkv, page_table)
        flat = out.view(n, pkv.num_layers, -1)
        for l, layer in enumerate(pkv.layers):
            flat[:, l].copy_(layer.view(2 * pkv.num_pages, -1).index_select(0, rows).view(n, -1))
        return out
    idx = page_table.reshape(-1).to(pkv.device)
    for l, layer in enumerate(pkv.layers):
        pages = layer.index_select(1, idx)                 # [2, n*ppb, P, H, D], contiguous
        out[:, l].copy_(pages.view(2, n, B, pkv.num_kv_heads, pkv.head_dim).transpose(0, 1))
    return out


def scatter(pkv: PagedKV, page_table: torch.Tensor, blocks: torch.Tensor) -> None:
    """The inverse of gather: layers[l][c, page_table[b, t // P], t % P] = blocks[b, l, c, t]."""
    n, ppb = page_table.shape
    P = pkv.page_tokens
    if n == 0:
        return
    if all(t.is_contiguous() for t in pkv.layers):
        rows = _rows(pkv, page_table)
        flat = blocks.view(n, pkv.num_layers, -1)
        for l, layer in enumerate(pkv.layers):
            layer.view(2 * pkv.num_pages, -1).index_copy_(0, rows, flat[:, l].reshape(rows.numel(), -1))
        return
    idx = page_table.reshape(-1).to(pkv.device)
    for l, layer in enumerate(pkv.layers):
        src = blocks[:, l].transpose(0, 1).reshape(2, n * ppb, P, pkv.num_kv_heads, pkv.head_dim)
        layer.index_copy_(1, idx, src)


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
