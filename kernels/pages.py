"""What is inside a vLLM KV page, per attention backend, and the kernels' view of it.

vLLM (0.32) hands connectors one ``[B, H, N, C]`` tensor per layer: B blocks, H kv heads, N
tokens per block, C = 2 * head_dim. That shape is only a container — which of C's elements are
K and which are V is the backend's choice:

  CPU_ATTN    each (block, head) page is [2, N, D]: the N keys, then the N values
              (the backend views [N, 2D] as [2N, D] and splits rows).
  FLASH_ATTN  each token's C is [K (D), V (D)] (the backend splits the last dim).
              Written from vLLM's source; GPU vLLM is untested.

A backend not in this table is refused: guessing would store garbage that later loads would
serve as KV (LMCache's server mode broke this way when vLLM changed its KV format).

``canonical`` gives each layer's cache as a strided ``[2, B, N, H, D]`` view of the same memory
— the per-layer layout of kvstore.kernels (paged.py) with one page per kvstore block — so the
connector moves blocks with the kernels' gather/scatter (Triton on CUDA, the torch reference
elsewhere) into and out of kvstore's block layout [layers, 2, N, H, D] (kvstore.core.layout).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from kvstore.core.layout import KVLayout
from kvstore.kernels.ops import gather, scatter
from kvstore.kernels.reference import wide_rows


@dataclass(frozen=True)
class PageFormat:
    backend: str
    layout: KVLayout
    _strides: Callable[[torch.Tensor, KVLayout], tuple[int, ...]]

    def canonical(self, kv: torch.Tensor) -> torch.Tensor:
        """[2, B, N, H, D] view (no copy) of one layer's ``[B, H, N, 2D]`` cache tensor."""
        L = self.layout
        want = (L.num_kv_heads, L.block_tokens, 2 * L.head_dim)
        if kv.dim() != 4 or tuple(kv.shape[1:]) != want:
            raise ValueError(f"KVStoreConnector: {self.backend} KV tensor has shape "
                             f"{tuple(kv.shape)}, expected [blocks, {want[0]}, {want[1]}, "
                             f"{want[2]}] ([B, H, N, 2*head_dim]); refusing to guess its layout")
        if str(kv.dtype).removeprefix("torch.") != L.dtype:
            raise ValueError(f"KVStoreConnector: KV tensor dtype {kv.dtype} != layout {L.dtype}")
        if kv.stride(3) != 1:
            raise ValueError(f"KVStoreConnector: {self.backend} KV tensor's channels are not "
                             f"contiguous (strides {kv.stride()}); refusing to guess its layout")
        return torch.as_strided(kv, size=(2, kv.shape[0], L.block_tokens, L.num_kv_heads,
                                          L.head_dim),
                                stride=self._strides(kv, L), storage_offset=kv.storage_offset())

    def gather(self, layers: list[torch.Tensor], block_ids: list[int]) -> torch.Tensor:
        """Copy of blocks ``block_ids`` as [n, layers, 2, N, H, D], on the cache's device."""
        return gather(layers, _page_table(block_ids))

    def scatter(self, layers: list[torch.Tensor], block_ids: list[int], data: torch.Tensor) -> None:
        """Write [n, layers, 2, N, H, D] ``data`` (any device) into blocks ``block_ids``."""
        dev = layers[0].device
        scatter(layers, _page_table(block_ids), data.to(dev).contiguous())


    def scatter_layer(self, layer: torch.Tensor, block_ids: list[int], blocks: torch.Tensor,
                      l: int) -> None:
        """Write layer ``l`` of [n, layers, 2, N, H, D] ``blocks`` into pages ``block_ids`` of
        ``layer`` (one layer's ``canonical`` view). ``blocks`` may have any block stride (arena
        rows) and must be on the layer's device; ids must be distinct (ValueError otherwise).

        One ``copy_`` per run of consecutive block ids, each moving whole head_dim rows (on
        CPU, ``index_copy_`` into these strided pages copies element by element), through an
        8-byte element view where the rows allow it: fewer, wider elements for the same bytes.
        ``copy_`` releases the GIL for its whole length (kvstore.client.layerwise)."""
        n = len(block_ids)
        if blocks.dim() != 6 or blocks.shape[0] != n or tuple(blocks.shape[2:]) != tuple(
                layer.shape[:1]) + tuple(layer.shape[2:]):
            raise ValueError(f"scatter_layer: blocks {tuple(blocks.shape)} do not fit {n} "
                             f"blocks of a layer {tuple(layer.shape)} ([2, B, N, H, D])")
        if len(set(block_ids)) != n or (n and not 0 <= min(block_ids) <= max(block_ids)
                                        < layer.shape[1]):
            raise ValueError(f"scatter_layer: block ids must be distinct pages of the layer's "
                             f"{layer.shape[1]}, got {block_ids}")
        dst = wide_rows(layer.transpose(0, 1))           # [B, 2, N, H, D]
        src = wide_rows(blocks[:, l])                    # [n, 2, N, H, D]
        if dst.dtype != src.dtype:
            dst, src = layer.transpose(0, 1), blocks[:, l]
        i = 0
        while i < n:
            j = i + 1
            while j < n and block_ids[j] == block_ids[j - 1] + 1:
                j += 1
            page = block_ids[i]
            dst[page:page + j - i].copy_(src[i:j])
            i = j


def _page_table(block_ids: list[int]) -> torch.Tensor:
    # one vLLM block is one kvstore block: a page table of one page per block
    return torch.as_tensor(block_ids, dtype=torch.int64).reshape(-1, 1)


def _cpu_attn(kv: torch.Tensor, L: KVLayout) -> tuple[int, ...]:
    if kv.stride(2) != 2 * L.head_dim:  # the backend reinterprets [N, 2D] as [2N, D]
        raise ValueError(f"KVStoreConnector: a CPU_ATTN page's [N, C] interior is not "
                         f"contiguous (strides {kv.stride()}); refusing to guess its layout")
    s_b, s_h = kv.stride(0), kv.stride(1)
    return (L.block_tokens * L.head_dim, s_b, L.head_dim, s_h, 1)


def _flash_attn(kv: torch.Tensor, L: KVLayout) -> tuple[int, ...]:
    s_b, s_h, s_n = kv.stride(0), kv.stride(1), kv.stride(2)
    return (L.head_dim, s_b, s_n, s_h, 1)


_FORMATS = {"CPU_ATTN": _cpu_attn, "FLASH_ATTN": _flash_attn}


def page_format_for(backend: str, layout: KVLayout) -> PageFormat:
    """The page format of ``backend``; ValueError naming the backend when it is unknown."""
    if backend not in _FORMATS:
        raise ValueError(f"KVStoreConnector does not know how the {backend!r} attention backend "
                         f"lays out K and V inside a page (known: {sorted(_FORMATS)}); refusing "
                         "to store or load its KV rather than misread it")
    return PageFormat(backend, layout, _FORMATS[backend])
