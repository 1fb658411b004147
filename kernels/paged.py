"""An engine's paged KV cache, described once so every kernel reads it the same way.

Three layouts are accepted, all with the token's KV as ``[kv_heads, head_dim]`` (head_dim
contiguous), any other strides allowed (an engine's real pages seen through a strided view:
kvstore.kernels.pages for vLLM's backends):

* per layer (vLLM FlashAttention style): a list of ``num_layers`` tensors, each
  ``[2, num_pages, page_tokens, kv_heads, head_dim]``, all of one shape, dtype, device and strides;
* layer first: one tensor ``[num_layers, 2, num_pages, page_tokens, kv_heads, head_dim]``;
* split K/V: a list of ``num_layers`` (K, V) pairs, each ``[num_pages, page_tokens, kv_heads,
  head_dim]``, all of one shape, dtype and device (a transformers DynamicCache layer's
  ``[1, heads, seq, head_dim]`` K and V seen as pages of a block's tokens: client/hf/cache.py).
  K and V live in separate tensors, so only the torch reference moves these.

A kvstore block covers ``block_tokens`` tokens; a page ``page_tokens`` tokens, which must divide
``block_tokens``. A *page table* maps kvstore blocks to engine pages: ``[n_blocks,
pages_per_block]`` integers, row i holding the pages of block i in token order. Its shape carries
the block size: ``block_tokens = pages_per_block * page_tokens``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


class KernelInputError(ValueError):
    """A cache, page table or block buffer does not fit the others (shape, dtype, device, ids)."""


@dataclass(frozen=True)
class PagedKV:
    """A view of an engine's paged cache. ``halves[l]`` is layer l's (K, V), each
    [pages, P, H, D]; ``layers[l]`` the same as one [2, pages, P, H, D] tensor (empty for a
    split K/V cache)."""

    layers: tuple[torch.Tensor, ...]
    layer_first: torch.Tensor | None = None   # the 6-D tensor, when the cache is one
    split: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()   # the (K, V) pairs, when split

    @property
    def halves(self) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        return self.split or tuple((t[0], t[1]) for t in self.layers)

    @classmethod
    def of(cls, cache) -> "PagedKV":
        """Wrap a per-layer list/tuple or a layer-first 6-D tensor (a PagedKV passes through)."""
        if isinstance(cache, PagedKV):
            return cache
        if isinstance(cache, torch.Tensor):
            if cache.dim() != 6 or cache.shape[1] != 2:
                raise KernelInputError(
                    f"a layer-first cache is [layers, 2, pages, page_tokens, kv_heads, head_dim], "
                    f"got shape {tuple(cache.shape)}")
            pkv = cls(tuple(cache.unbind(0)), cache)
        elif isinstance(cache, (list, tuple)) and cache and all(
                isinstance(p, (list, tuple)) for p in cache):
            if not all(len(p) == 2 and all(isinstance(t, torch.Tensor) for t in p)
                       for p in cache):
                raise KernelInputError("a split K/V cache is a list of (K, V) tensor pairs")
            pkv = cls((), None, tuple((p[0], p[1]) for p in cache))
        elif isinstance(cache, (list, tuple)) and cache:
            if not all(isinstance(t, torch.Tensor) for t in cache):
                raise KernelInputError("a per-layer cache is a list of tensors")
            pkv = cls(tuple(cache))
        else:
            raise KernelInputError(f"expected a list of per-layer tensors or one 6-D tensor, "
                                   f"got {type(cache).__name__}")
        pkv._check()
        return pkv

    def _check(self) -> None:
        if self.split:
            self._check_split()
            return
        first = self.layers[0]
        if first.dim() != 5 or first.shape[0] != 2:
            raise KernelInputError(f"a layer of the cache is [2, pages, page_tokens, kv_heads, "
                                   f"head_dim], got shape {tuple(first.shape)}")
        for i, t in enumerate(self.layers):
            if (t.shape != first.shape or t.dtype != first.dtype or t.device != first.device
                    or t.stride() != first.stride()):
                raise KernelInputError(
                    f"layer {i} is {tuple(t.shape)} {t.dtype} on {t.device} strides {t.stride()}; "
                    f"layer 0 is {tuple(first.shape)} {first.dtype} on {first.device} strides "
                    f"{first.stride()}: all layers must agree")
        if first.stride(4) != 1:
            raise KernelInputError("head_dim must be the contiguous dimension of the cache")

    def _check_split(self) -> None:
        first = self.split[0][0]
        if first.dim() != 4:
            raise KernelInputError(f"a split K/V cache's K and V are [pages, page_tokens, "
                                   f"kv_heads, head_dim], got shape {tuple(first.shape)}")
        for i, pair in enumerate(self.split):
            for t, what in zip(pair, "KV"):
                if t.shape != first.shape or t.dtype != first.dtype or t.device != first.device:
                    raise KernelInputError(
                        f"layer {i} {what} is {tuple(t.shape)} {t.dtype} on {t.device}; layer 0 "
                        f"K is {tuple(first.shape)} {first.dtype} on {first.device}: all must "
                        "agree")
                if t.stride(3) != 1:
                    raise KernelInputError("head_dim must be the contiguous dimension of the cache")

    @property
    def _k0(self) -> torch.Tensor:
        return self.split[0][0] if self.split else self.layers[0][0]

    @property
    def num_layers(self) -> int:
        return len(self.split or self.layers)

    @property
    def num_pages(self) -> int:
        return self._k0.shape[0]

    @property
    def page_tokens(self) -> int:
        return self._k0.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self._k0.shape[2]

    @property
    def head_dim(self) -> int:
        return self._k0.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self._k0.dtype

    @property
    def device(self) -> torch.device:
        return self._k0.device

    def block_shape(self, block_tokens: int) -> tuple[int, int, int, int, int]:
        return (self.num_layers, 2, block_tokens, self.num_kv_heads, self.head_dim)


def check_page_table(pkv: PagedKV, page_table, *, unique: bool) -> torch.Tensor:
    """Validate a page table against ``pkv``; returns it as a CPU int64 [n, ppb] tensor.

    ``unique`` is required for scatter (two blocks writing one page would race). Raises
    KernelInputError naming the first bad entry. Validation happens on the CPU copy, so a page
    table that lives on the GPU costs one device sync here.
    """
    pt = torch.as_tensor(page_table)
    if pt.dim() != 2 or pt.shape[1] == 0:
        raise KernelInputError(f"page_table must be [n_blocks, pages_per_block], got shape "
                               f"{tuple(pt.shape)}")
    if pt.dtype.is_floating_point or pt.dtype == torch.bool or pt.is_complex():
        raise KernelInputError(f"page_table must hold integers, got {pt.dtype}")
    pt = pt.to("cpu", torch.int64)
    if pt.numel():
        lo, hi = int(pt.min()), int(pt.max())
        if lo < 0 or hi >= pkv.num_pages:
            bad = lo if lo < 0 else hi
            raise KernelInputError(f"page id {bad} is outside the cache's {pkv.num_pages} pages")
        if unique and torch.unique(pt).numel() != pt.numel():
            raise KernelInputError("page_table names a page twice: scatter would write it twice")
    return pt


def check_blocks(pkv: PagedKV, pt: torch.Tensor, blocks: torch.Tensor, dtype=None,
                 what: str = "blocks") -> None:
    """``blocks`` must be a [n, L, 2, B, H, D] tensor on the cache's device, contiguous unless
    the cache is split K/V (moved by the torch reference only, which takes any strides)."""
    want = (pt.shape[0], *pkv.block_shape(pt.shape[1] * pkv.page_tokens))
    dtype = dtype or pkv.dtype
    if tuple(blocks.shape) != want:
        raise KernelInputError(f"{what} shape is {tuple(blocks.shape)}, expected {want} "
                               "([blocks, layers, 2, block_tokens, kv_heads, head_dim])")
    if blocks.dtype != dtype:
        raise KernelInputError(f"{what} dtype is {blocks.dtype}, expected {dtype}")
    if blocks.device != pkv.device:
        raise KernelInputError(f"{what} are on {blocks.device}, the cache on {pkv.device}")
    if not blocks.is_contiguous() and not pkv.split:
        raise KernelInputError(f"{what} must be contiguous")
