"""Quantized namespaces: the SDK quantizes blocks on put and dequantizes them on get.

A layout with ``quant`` ("int8" or "float8_e4m3fn") stores each block as a one-byte payload of
the block's shape followed by one float32 scale per (layer, k|v) (kvstore.core.layout): about half
the bytes of bf16 in DRAM, on SSD and on the wire. Callers keep putting and getting tensors of
the layout's ``dtype`` and ``block_shape``; the values come back within the bound documented in
kvstore/kernels/quant.py (int8: amax/254 per (block, layer, k|v) slab). The kernels are torch
ops, so a CUDA tensor is quantized and dequantized on its GPU and only the packed bytes cross
PCIe.
"""
from __future__ import annotations

from kvstore.client.errors import InvalidArgument
from kvstore.core.layout import KVLayout


def _torch():
    import torch
    return torch


def pack(kv, layout: KVLayout, n_blocks: int):
    """Quantize ``kv`` ([n, *block_shape] of layout.dtype) into [n, block_bytes] uint8 rows on
    kv's device."""
    torch = _torch()
    if not isinstance(kv, torch.Tensor):
        raise InvalidArgument(f"a quantized namespace ({layout.quant}) takes torch tensors")
    want = (n_blocks, *layout.block_shape)
    dtype = str(kv.dtype).removeprefix("torch.")
    if dtype != layout.dtype or tuple(kv.shape) != want:
        raise InvalidArgument(f"kv is {dtype} {tuple(kv.shape)}, the namespace layout says "
                              f"{layout.dtype} {want}")
    from kvstore.kernels import quantize
    q = quantize(kv.contiguous(), layout.quant)
    rows = torch.empty((n_blocks, layout.block_bytes), dtype=torch.uint8, device=kv.device)
    p = layout.payload_bytes
    rows[:, :p].copy_(q.data.reshape(n_blocks, p).view(torch.uint8))
    rows[:, p:].copy_(q.scales.reshape(n_blocks, -1).contiguous().view(torch.uint8))
    return rows


def staging_for(out, layout: KVLayout, n_blocks: int):
    """Packed rows a get reads into: on ``out``'s device (checked first), or the CPU."""
    torch = _torch()
    device = "cpu"
    if out is not None:
        if not isinstance(out, torch.Tensor) or not out.is_contiguous():
            raise InvalidArgument("out of a quantized namespace must be a contiguous torch tensor")
        if str(out.dtype).removeprefix("torch.") != layout.dtype or \
                out.numel() < n_blocks * _elements(layout):
            raise InvalidArgument(f"out must hold {n_blocks} blocks of {layout.dtype} "
                                  f"{layout.block_shape}, got {out.dtype} {tuple(out.shape)}")
        device = out.device
    return torch.empty((n_blocks, layout.block_bytes), dtype=torch.uint8, device=device)


def unpack(rows, layout: KVLayout, out=None):
    """Dequantize packed rows into ``out`` (its first len(rows) blocks, returned) or a new
    [n, *block_shape] tensor of layout.dtype."""
    torch = _torch()
    from kvstore.kernels import QuantizedBlocks, dequantize
    n, p = rows.shape[0], layout.payload_bytes
    data = rows[:, :p].view(getattr(torch, layout.quant)).view(n, *layout.block_shape)
    scales = rows[:, p:].contiguous().view(torch.float32).view(n, layout.num_layers, 2)
    values = dequantize(QuantizedBlocks(data, scales), getattr(torch, layout.dtype))
    if out is None:
        return values
    dst = out.view(-1)[:n * _elements(layout)].view(n, *layout.block_shape)
    dst.copy_(values)
    return dst


def _elements(layout: KVLayout) -> int:
    return layout.num_layers * 2 * layout.block_tokens * layout.num_kv_heads * layout.head_dim
