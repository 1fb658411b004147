"""Data-movement kernels between an engine's paged KV cache and kvstore's contiguous blocks.

    from kvstore.kernels import gather, scatter
    blocks = gather(kv_caches, page_table)      # [n, layers, 2, block_tokens, kv_heads, head_dim]
    scatter(kv_caches, page_table, blocks)      # and back, into (other) pages

``kv_caches`` is a list of per-layer [2, pages, page_tokens, kv_heads, head_dim] tensors (vLLM)
or one layer-first [layers, 2, pages, page_tokens, kv_heads, head_dim] tensor; ``page_table`` is
[n_blocks, pages_per_block] (see ``paged``). CUDA caches use Triton kernels (one launch for all
layers); anything else the torch reference, which defines the results. ``gather_quantized`` /
``scatter_dequantized`` add int8 or fp8 quantization with per-(block, layer, k|v) scales; the
error bound is in ``quant``.
"""
from kvstore.kernels.ops import (dequantize, gather, gather_quantized, quantize, scatter,
                                 scatter_dequantized)
from kvstore.kernels.paged import KernelInputError, PagedKV
from kvstore.kernels.quant import QMAX, QuantizedBlocks, error_bound

__all__ = ["gather", "scatter", "gather_quantized", "scatter_dequantized", "quantize",
           "dequantize", "PagedKV", "KernelInputError", "QuantizedBlocks", "QMAX", "error_bound"]
