"""Public entry points: validate once, then run the Triton kernel (CUDA) or the torch reference.

``impl``: "auto" (Triton for CUDA caches, the reference otherwise), "torch" or "triton" (the
latter also runs on CPU tensors under TRITON_INTERPRET=1, which is how CI checks the kernels'
indexing without a GPU). Every function raises KernelInputError (a ValueError) on a cache, page
table or buffer that do not fit each other, before touching any memory.
"""
from __future__ import annotations

import os

import torch

from kvstore.kernels import reference
from kvstore.kernels.paged import KernelInputError, PagedKV, check_blocks, check_page_table
from kvstore.kernels.quant import QuantizedBlocks, qdtype

_IMPLS = ("auto", "torch", "triton")


def _use_triton(pkv: PagedKV, impl: str) -> bool:
    if impl not in _IMPLS:
        raise KernelInputError(f"impl must be one of {_IMPLS}, got {impl!r}")
    if pkv.split:      # K and V in separate tensors: the kernels index one tensor per layer
        if impl == "triton":
            raise KernelInputError("impl='triton' needs one tensor per layer; a split K/V "
                               "cache is moved by the torch reference")
        return False
    if impl == "triton" and pkv.device.type != "cuda" \
            and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise KernelInputError(f"impl='triton' needs CUDA tensors (the cache is on {pkv.device}); "
                               "on CPU only under TRITON_INTERPRET=1")
    return impl == "triton" or (impl == "auto" and pkv.device.type == "cuda")


def _triton():
    from kvstore.kernels import triton_kv      # lazy: triton is optional, CUDA-only in practice
    return triton_kv


def gather(cache, page_table, out: torch.Tensor | None = None, *, impl: str = "auto") -> torch.Tensor:
    """Copy the pages named by ``page_table`` into contiguous kvstore blocks.

    Returns ``out`` (allocated if None): [n_blocks, layers, 2, block_tokens, kv_heads, head_dim]
    in the cache's dtype and device, with block_tokens = pages_per_block * page_tokens.
    """
    pkv = PagedKV.of(cache)
    pt = check_page_table(pkv, page_table, unique=False)
    B = pt.shape[1] * pkv.page_tokens
    if out is None:
        out = torch.empty((pt.shape[0], *pkv.block_shape(B)), dtype=pkv.dtype, device=pkv.device)
    check_blocks(pkv, pt, out, what="out")
    if _use_triton(pkv, impl):
        _triton().copy(pkv, pt, out, to_cache=False)
    else:
        reference.gather(pkv, pt, out)
    return out


def scatter(cache, page_table, blocks: torch.Tensor, *, impl: str = "auto") -> None:
    """Write contiguous kvstore blocks back into the cache pages named by ``page_table``.

    Pages must be distinct (KernelInputError otherwise); other pages are untouched.
    """
    pkv = PagedKV.of(cache)
    pt = check_page_table(pkv, page_table, unique=True)
    check_blocks(pkv, pt, blocks)
    if _use_triton(pkv, impl):
        _triton().copy(pkv, pt, blocks, to_cache=True)
    else:
        reference.scatter(pkv, pt, blocks)


def gather_quantized(cache, page_table, qdtype_name: str = "int8", *,
                     impl: str = "auto") -> QuantizedBlocks:
    """gather + quantize (see kvstore.kernels.quant) in one pass over the cache."""
    pkv = PagedKV.of(cache)
    pt = check_page_table(pkv, page_table, unique=False)
    _check_quant(pkv, qdtype_name, impl)
    if _use_triton(pkv, impl):
        return _triton().gather_quantized(pkv, pt, qdtype_name)
    return reference.quantize(gather(pkv, pt, impl="torch"), qdtype_name)


def scatter_dequantized(cache, page_table, q: QuantizedBlocks, *, impl: str = "auto") -> None:
    """dequantize + scatter in one pass: the inverse of gather_quantized (within its bound)."""
    pkv = PagedKV.of(cache)
    pt = check_page_table(pkv, page_table, unique=True)
    _check_quant(pkv, q.qdtype, impl)
    check_blocks(pkv, pt, q.data, dtype=q.data.dtype, what="quantized data")
    want = (pt.shape[0], pkv.num_layers, 2)
    if tuple(q.scales.shape) != want or q.scales.dtype != torch.float32 \
            or q.scales.device != pkv.device or not q.scales.is_contiguous():
        raise KernelInputError(f"scales must be contiguous float32 {want} on {pkv.device}, got "
                               f"{q.scales.dtype} {tuple(q.scales.shape)} on {q.scales.device}")
    if _use_triton(pkv, impl):
        _triton().scatter_dequantized(pkv, pt, q)
    else:
        reference.scatter(pkv, pt, reference.dequantize(q, pkv.dtype))


def quantize(blocks: torch.Tensor, qdtype_name: str = "int8") -> QuantizedBlocks:
    """Quantize contiguous [n, L, 2, B, H, D] blocks (torch reference, any device)."""
    if blocks.dim() != 6 or blocks.shape[2] != 2 or not blocks.dtype.is_floating_point:
        raise KernelInputError(f"blocks must be float [n, layers, 2, block_tokens, kv_heads, "
                               f"head_dim], got {blocks.dtype} {tuple(blocks.shape)}")
    try:
        qdtype(qdtype_name)
    except ValueError as exc:
        raise KernelInputError(str(exc)) from None
    return reference.quantize(blocks, qdtype_name)


def dequantize(q: QuantizedBlocks, dtype: torch.dtype) -> torch.Tensor:
    return reference.dequantize(q, dtype)


def _check_quant(pkv: PagedKV, name: str, impl: str) -> None:
    try:
        qdtype(name)
    except ValueError as exc:
        raise KernelInputError(str(exc)) from None
    if not pkv.dtype.is_floating_point or pkv.dtype.itemsize < 2:
        raise KernelInputError(f"quantize-on-offload needs a 16/32-bit float cache, got {pkv.dtype}")
    if name != "int8" and pkv.device.type == "cuda" and _use_triton(pkv, impl) \
            and torch.cuda.get_device_capability(pkv.device) < (8, 9):
        raise KernelInputError("fp8 e4m3 conversion needs compute capability 8.9+; use int8")
