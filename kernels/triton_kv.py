"""Triton kernels for CUDA caches: one launch moves a batch of blocks for every layer.

Imported only when a CUDA tensor (or an explicit ``impl="triton"``) asks for it, so kvstore
installs and runs without triton. They must match ``reference`` bit for bit (tests compare them:
on a GPU, and on the CPU through triton's interpreter, TRITON_INTERPRET=1).

Addressing: every layer is reached from layer 0's pointer plus a per-layer element offset (a
small int64 table), so one launch covers both a list of per-layer tensors and a layer-first
tensor, and the base pointer keeps triton's 16-byte alignment specialization (a pointer loaded
from a table would not, and the copies would not vectorize).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvstore.kernels.paged import KernelInputError, PagedKV
from kvstore.kernels.quant import QMAX, QuantizedBlocks, qdtype

_TILE = 1024
_ALIGN_BYTES = 16


@triton.jit
def _copy_pages(cache, layer_off, page_table, blocks, s_kv, s_page, s_tok, s_head,
                L: tl.constexpr, PPB: tl.constexpr, P: tl.constexpr, H: tl.constexpr,
                D: tl.constexpr, TILE: tl.constexpr, DENSE: tl.constexpr, ALIGN: tl.constexpr,
                TO_CACHE: tl.constexpr):
    # grid: (block * page-of-block, layer * k|v, tile of the page)
    pid_page = tl.program_id(0).to(tl.int64)
    pid_lc = tl.program_id(1)
    layer = pid_lc // 2
    c = pid_lc % 2
    b = pid_page // PPB
    j = pid_page % PPB
    PAGE: tl.constexpr = P * H * D
    page = tl.load(page_table + pid_page).to(tl.int64)
    base = tl.load(layer_off + layer) + c * s_kv + page * s_page
    e = tl.program_id(2) * TILE + tl.arange(0, TILE)
    mask = e < PAGE
    if DENSE:
        src = base + e
    else:
        r = e % (H * D)
        src = base + (e // (H * D)) * s_tok + (r // D) * s_head + r % D
    dst = (b * (2 * L) + pid_lc) * (PPB * PAGE) + j * PAGE + e
    if ALIGN > 1:
        # Host checked: every offset term is a multiple of ALIGN elements (16 bytes).
        dst = tl.max_contiguous(tl.multiple_of(dst, ALIGN), TILE)
        if DENSE:
            src = tl.max_contiguous(tl.multiple_of(src, ALIGN), TILE)
    if TO_CACHE:
        tl.store(cache + src, tl.load(blocks + dst, mask=mask), mask=mask)
    else:
        tl.store(blocks + dst, tl.load(cache + src, mask=mask), mask=mask)


@triton.jit
def _page_offsets(layer_off, page_table, b, j, c, e, s_kv, s_page, s_tok, s_head, layer,
                  PPB: tl.constexpr, H: tl.constexpr, D: tl.constexpr, TILE: tl.constexpr,
                  DENSE: tl.constexpr, ALIGN: tl.constexpr):
    # element offsets (from layer 0) of elements e of page j of block b, this layer, half c
    page = tl.load(page_table + b * PPB + j).to(tl.int64)
    base = tl.load(layer_off + layer) + c * s_kv + page * s_page
    if DENSE:
        src = base + e
        if ALIGN > 1:
            src = tl.max_contiguous(tl.multiple_of(src, ALIGN), TILE)
    else:
        r = e % (H * D)
        src = base + (e // (H * D)) * s_tok + (r // D) * s_head + r % D
    return src


@triton.jit
def _gather_quant(cache, layer_off, page_table, q, scales, s_kv, s_page, s_tok, s_head,
                  L: tl.constexpr, PPB: tl.constexpr, P: tl.constexpr, H: tl.constexpr,
                  D: tl.constexpr, TILE: tl.constexpr, DENSE: tl.constexpr,
                  ALIGN: tl.constexpr, QMAX_: tl.constexpr, INT8: tl.constexpr):
    # grid: (block, layer * k|v); one program owns one slab, so amax needs no second launch.
    # Two passes over the slab (amax, then quantize); the second mostly hits L2.
    b = tl.program_id(0).to(tl.int64)
    pid_lc = tl.program_id(1)
    layer = pid_lc // 2
    c = pid_lc % 2
    PAGE: tl.constexpr = P * H * D
    amax = tl.zeros([TILE], dtype=tl.float32)
    for j in range(PPB):
        for start in range(0, PAGE, TILE):
            e = start + tl.arange(0, TILE)
            mask = e < PAGE
            src = _page_offsets(layer_off, page_table, b, j, c, e, s_kv, s_page, s_tok, s_head,
                                layer, PPB, H, D, TILE, DENSE, ALIGN)
            x = tl.load(cache + src, mask=mask, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
    m = tl.max(amax, axis=0)
    tl.store(scales + b * (2 * L) + pid_lc, tl.math.div_rn(m, QMAX_))
    # m == 0 divides by zero (inf, no trap) and is then discarded, as in the reference
    inv = tl.where(m > 0, tl.math.div_rn(tl.full([], QMAX_, tl.float32), m), 0.0)
    out = (b * (2 * L) + pid_lc) * (PPB * PAGE)
    for j in range(PPB):
        for start in range(0, PAGE, TILE):
            e = start + tl.arange(0, TILE)
            mask = e < PAGE
            src = _page_offsets(layer_off, page_table, b, j, c, e, s_kv, s_page, s_tok, s_head,
                                layer, PPB, H, D, TILE, DENSE, ALIGN)
            y = tl.load(cache + src, mask=mask, other=0.0).to(tl.float32) * inv
            y = tl.minimum(tl.maximum(y, -QMAX_), QMAX_)
            if INT8:
                y = tl.where(y >= 0, tl.floor(y + 0.5), -tl.floor(0.5 - y))
            tl.store(q + out + j * PAGE + e, y.to(q.dtype.element_ty), mask=mask)


@triton.jit
def _dequant_scatter(cache, layer_off, page_table, q, scales, s_kv, s_page, s_tok, s_head,
                     L: tl.constexpr, PPB: tl.constexpr, P: tl.constexpr, H: tl.constexpr,
                     D: tl.constexpr, TILE: tl.constexpr, DENSE: tl.constexpr,
                     ALIGN: tl.constexpr):
    # grid: (block * page-of-block, layer * k|v, tile of the page), like _copy_pages
    pid_page = tl.program_id(0).to(tl.int64)
    pid_lc = tl.program_id(1)
    layer = pid_lc // 2
    c = pid_lc % 2
    b = pid_page // PPB
    j = pid_page % PPB
    PAGE: tl.constexpr = P * H * D
    e = tl.program_id(2) * TILE + tl.arange(0, TILE)
    mask = e < PAGE
    dst = _page_offsets(layer_off, page_table, b, j, c, e, s_kv, s_page, s_tok, s_head, layer,
                        PPB, H, D, TILE, DENSE, ALIGN)
    scale = tl.load(scales + b * (2 * L) + pid_lc)
    x = tl.load(q + (b * (2 * L) + pid_lc) * (PPB * PAGE) + j * PAGE + e, mask=mask)
    tl.store(cache + dst, (x.to(tl.float32) * scale).to(cache.dtype.element_ty), mask=mask)


# -- launchers ---------------------------------------------------------------------------------
_offset_tables: dict[tuple, torch.Tensor] = {}


def _layer_offsets(pkv: PagedKV) -> torch.Tensor:
    """Element offsets of each layer from layer 0, as an int64 tensor on the cache's device."""
    ptrs = tuple(t.data_ptr() for t in pkv.layers)
    key = (ptrs, str(pkv.device), pkv.dtype)
    table = _offset_tables.get(key)
    if table is None:
        es = pkv.layers[0].element_size()
        diffs = [p - ptrs[0] for p in ptrs]
        if any(d % es for d in diffs):
            raise KernelInputError("cache layers are not element-aligned to each other")
        if len(_offset_tables) > 64:       # engines keep one cache: a small bound is plenty
            _offset_tables.clear()
        table = torch.tensor([d // es for d in diffs], dtype=torch.int64).to(pkv.device)
        _offset_tables[key] = table
    return table


def _strides(pkv: PagedKV):
    s = pkv.layers[0].stride()
    return s[0], s[1], s[2], s[3]


def _alignment(pkv: PagedKV, blocks: torch.Tensor, page_elems: int) -> int:
    # 16-byte aligned layers also make every layer offset a multiple of ALIGN elements
    es = pkv.layers[0].element_size()
    align = max(1, _ALIGN_BYTES // es)
    s_kv, s_page, _, _ = _strides(pkv)
    ok = (all(t.data_ptr() % _ALIGN_BYTES == 0 for t in pkv.layers)
          and blocks.data_ptr() % _ALIGN_BYTES == 0
          and s_kv % align == 0 and s_page % align == 0 and page_elems % align == 0)
    return align if ok else 1


def _dense(pkv: PagedKV) -> bool:
    _, _, s_tok, s_head = _strides(pkv)
    return s_head == pkv.head_dim and s_tok == pkv.num_kv_heads * pkv.head_dim


def copy(pkv: PagedKV, page_table: torch.Tensor, blocks: torch.Tensor, to_cache: bool) -> None:
    """Gather (to_cache=False) or scatter (True) every layer of ``blocks`` in one launch."""
    n, ppb = page_table.shape
    if n == 0:
        return
    P, H, D = pkv.page_tokens, pkv.num_kv_heads, pkv.head_dim
    offsets = _layer_offsets(pkv)
    pt = page_table.to(pkv.device, non_blocking=True).contiguous()
    page_elems = P * H * D
    grid = (n * ppb, 2 * pkv.num_layers, triton.cdiv(page_elems, _TILE))
    _copy_pages[grid](pkv.layers[0], offsets, pt, blocks, *_strides(pkv),
                      L=pkv.num_layers, PPB=ppb, P=P, H=H, D=D, TILE=_TILE,
                      DENSE=_dense(pkv), ALIGN=_alignment(pkv, blocks, page_elems),
                      TO_CACHE=to_cache, num_warps=4)


def gather_quantized(pkv: PagedKV, page_table: torch.Tensor, name: str) -> QuantizedBlocks:
    n, ppb = page_table.shape
    dt = qdtype(name)
    B = ppb * pkv.page_tokens
    data = torch.empty((n, *pkv.block_shape(B)), dtype=dt, device=pkv.device)
    scales = torch.empty((n, pkv.num_layers, 2), dtype=torch.float32, device=pkv.device)
    if n:
        pt = page_table.to(pkv.device, non_blocking=True).contiguous()
        offsets = _layer_offsets(pkv)
        page_elems = pkv.page_tokens * pkv.num_kv_heads * pkv.head_dim
        _gather_quant[(n, 2 * pkv.num_layers)](
            pkv.layers[0], offsets, pt, data, scales, *_strides(pkv),
            L=pkv.num_layers, PPB=ppb, P=pkv.page_tokens, H=pkv.num_kv_heads, D=pkv.head_dim,
            TILE=_TILE, DENSE=_dense(pkv), ALIGN=_alignment(pkv, data, page_elems),
            QMAX_=QMAX[name], INT8=name == "int8", num_warps=4)
    return QuantizedBlocks(data, scales)


def scatter_dequantized(pkv: PagedKV, page_table: torch.Tensor, q: QuantizedBlocks) -> None:
    n, ppb = page_table.shape
    if n == 0:
        return
    P, H, D = pkv.page_tokens, pkv.num_kv_heads, pkv.head_dim
    pt = page_table.to(pkv.device, non_blocking=True).contiguous()
    offsets = _layer_offsets(pkv)
    grid = (n * ppb, 2 * pkv.num_layers, triton.cdiv(P * H * D, _TILE))
    _dequant_scatter[grid](pkv.layers[0], offsets, pt, q.data, q.scales, *_strides(pkv),
                           L=pkv.num_layers, PPB=ppb, P=P, H=H, D=D, TILE=_TILE,
                           DENSE=_dense(pkv), ALIGN=_alignment(pkv, q.data, P * H * D),
                           num_warps=4)
