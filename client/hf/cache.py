"""Moving KV between kvstore blocks and a transformers ``DynamicCache``, layer by layer.

Block bytes are ``[num_layers, 2 (k, v), block_tokens, kv_heads, head_dim]``; a transformers
cache layer holds ``[batch=1, kv_heads, seq, head_dim]`` per K and V. Three pieces:

- :class:`LayerLoader` copies a leased prefix out of the shared arena on a background thread,
  one layer at a time, and sets one event per layer. The lease is released *before* the last
  layer is published: if the release reports the lease stale (expired, or lost with a daemon
  restart), the last layer's wait raises :class:`PrefixLoadFailed` and the forward pass aborts
  before any logit is produced, so bytes that may have been overwritten are never used.
- :class:`PrefixCache` is a ``DynamicCache`` whose layer ``i`` reports the prefix length at once
  but waits for layer ``i``'s event only when the model reaches layer ``i`` — compute of the
  first layers overlaps the copy of the later ones. It also tells its owner when the prefill
  forward is over (the next forward begins, i.e. the first token has been sampled), which is when
  the new blocks are handed to the store: storing never delays the first token.
- :func:`pack_blocks` turns cache layers back into block layout for ``Namespace.put``.

Both directions move bytes with kvstore.kernels' gather/scatter: a cache layer's K and V,
``[1, kv_heads, seq, head_dim]``, are seen as pages of one block's tokens each (``sequence_pages``,
a strided view, no copy), a split K/V cache in the kernels' terms.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from kvstore.client.transfer import strided_runs
from kvstore.core.layout import KVLayout
from kvstore.kernels.ops import gather, scatter


class PrefixLoadFailed(RuntimeError):
    """The leased prefix could not be loaded intact; the request must be recomputed."""


@dataclass
class LoadTimeline:
    """Seconds since the request began: when each layer's prefix was ready, when compute asked."""
    t0: float = field(default_factory=time.perf_counter)
    loaded_s: list[float] = field(default_factory=list)
    needed_s: list[float] = field(default_factory=list)
    waited_s: list[float] = field(default_factory=list)

    def now(self) -> float:
        return time.perf_counter() - self.t0


class LayerLoader:
    """Copies ``n_blocks`` leased blocks into per-layer K/V tensors on a background thread.

    ``wait(i)`` blocks until layer ``i`` is copied and returns its (K, V), each
    ``[1, kv_heads, n_blocks * block_tokens + extra_tokens, head_dim]`` with the prefix in the
    first ``n_blocks * block_tokens`` positions: the room after it takes the suffix's KV without
    another copy of the prefix. It raises PrefixLoadFailed if the copy or the lease failed (for
    the last layer: also when the release found the lease stale). ``release`` is called exactly
    once, from the loader thread, after the last copy.
    """

    def __init__(self, views: list[torch.Tensor], offsets: list[int], layout: KVLayout,
                 n_blocks: int, release, timeline: LoadTimeline, wait_timeout_s: float = 60.0,
                 extra_tokens: int = 0, device: str | torch.device = "cpu"):
        self.layout = layout
        self.n_blocks = n_blocks
        self.prefix_tokens = n_blocks * layout.block_tokens
        self.extra_tokens = extra_tokens
        self.device = torch.device(device)
        self.timeline = timeline
        self._views = views[:n_blocks]
        self._offsets = offsets[:n_blocks]
        self._release = release
        self._timeout_s = wait_timeout_s
        self._events = [threading.Event() for _ in range(layout.num_layers)]
        self._kv: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * layout.num_layers
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kvstore-hf-load", daemon=True)

    def start(self) -> "LayerLoader":
        self._thread.start()
        return self

    def _sources(self):
        """One typed [run, L, 2, B, H, D] view per arithmetic run of slots (no copy)."""
        lay = self.layout
        dtype = getattr(torch, lay.dtype)
        esize = lay.element_bytes
        storage = self._views[0].untyped_storage()
        base0 = self._views[0].storage_offset() - self._offsets[0]  # arena byte 0 in storage
        shape = lay.block_shape
        inner = []
        acc = 1
        for dim in reversed(shape):
            inner.insert(0, acc)
            acc *= dim
        out = []
        for first, n, stride in strided_runs(self._offsets):
            start = base0 + self._offsets[first]
            src = torch.empty(0, dtype=dtype).set_(
                storage, start // esize, (n, *shape), (stride // esize or acc, *inner))
            out.append((first, n, src))
        return out

    def _run(self) -> None:
        lay = self.layout
        L, B, H, D = lay.num_layers, lay.block_tokens, lay.num_kv_heads, lay.head_dim
        T = self.n_blocks * B
        dtype = getattr(torch, lay.dtype)
        try:
            sources = self._sources()
            for i in range(L):
                # On an accelerator, copy_ from host memory returns once the bytes are there,
                # so publishing the event after it is safe for any stream that reads them.
                k = torch.empty((1, H, T + self.extra_tokens, D), dtype=dtype, device=self.device)
                v = torch.empty((1, H, T + self.extra_tokens, D), dtype=dtype, device=self.device)
                pages = [sequence_pages(k, v, B, 0, self.n_blocks)]
                for first, n, src in sources:
                    # src[:, i:i + 1] is the run's layer i, [n, 1, 2, B, H, D]: into pages
                    # [first, first + n) of this layer
                    ids = torch.arange(first, first + n).view(-1, 1)
                    scatter(pages, ids, src[:, i:i + 1].to(self.device))
                self._kv[i] = (k, v)
                if i == L - 1:
                    self._views = []
                    self._release()  # raises if the lease went stale: then nothing is published
                self.timeline.loaded_s.append(self.timeline.now())
                self._events[i].set()
        except BaseException as exc:  # noqa: BLE001 - any failure means "recompute"
            self._error = exc
            self._views = []
            for ev in self._events:
                ev.set()

    def wait(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._events[i].wait(self._timeout_s):
            raise PrefixLoadFailed(f"layer {i} of the cached prefix did not arrive in "
                                   f"{self._timeout_s:g}s")
        # A failure before layer i was published leaves _kv[i] empty; one after (only the
        # release, before the last layer) poisons every later wait, i.e. the last layer.
        if self._kv[i] is None or (self._error is not None and i == self.layout.num_layers - 1):
            raise PrefixLoadFailed(f"cached prefix could not be loaded: {self._error}")
        return self._kv[i]

    def join(self, timeout_s: float = 60.0) -> None:
        self._thread.join(timeout_s)


class _PrefixLayer(DynamicLayer):
    """A DynamicLayer that starts with a cached prefix arriving from a LayerLoader."""

    def __init__(self, cache: "PrefixCache", layer_idx: int, prefix_tokens: int):
        super().__init__()
        self._cache = cache
        self._idx = layer_idx
        self._pending = prefix_tokens

    def _materialize(self, key_states=None, value_states=None) -> bool:
        """Take the prefix from the loader; True if the new states were placed after it too."""
        if not self._pending:
            return False
        tl = self._cache.timeline
        tl.needed_s.append(tl.now())
        k, v = self._cache.loader.wait(self._idx)
        tl.waited_s.append(tl.now())
        T = self._pending
        self.dtype, self.device = k.dtype, k.device
        self.is_initialized = True
        self._pending = 0
        if (key_states is not None and k.shape[-2] == T + key_states.shape[-2]
                and key_states.shape[:2] == k.shape[:2] and key_states.dtype == k.dtype
                and key_states.device == k.device):
            # The loader left room for exactly this suffix: no concatenation copy.
            k[..., T:, :] = key_states
            v[..., T:, :] = value_states
            self.keys, self.values = k, v
            return True
        self.keys, self.values = k[..., :T, :], v[..., :T, :]
        if key_states is not None and key_states.shape[0] != 1:
            # generate expanded the prompt (beams, num_return_sequences) but not our cache:
            # every row shares the prompt's prefix; the concatenation in update copies it.
            b = key_states.shape[0]
            self.keys = self.keys.expand(b, -1, -1, -1)
            self.values = self.values.expand(b, -1, -1, -1)
        return False

    def get_seq_length(self) -> int:
        return self._pending or super().get_seq_length()

    def update(self, key_states, value_states, *args, **kwargs):
        if self._materialize(key_states, value_states):
            return self.keys, self.values
        return super().update(key_states, value_states, *args, **kwargs)

    def crop(self, tokens_to_remove: int) -> None:
        self._materialize()
        super().crop(tokens_to_remove)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._materialize()
        super().batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices) -> None:
        self._materialize()
        super().batch_select_indices(indices)

    def reorder_cache(self, beam_idx) -> None:
        self._materialize()
        super().reorder_cache(beam_idx)


class PrefixCache(DynamicCache):
    """DynamicCache pre-filled (lazily, per layer) with a cached prefix.

    ``on_prefill_done(cache)`` runs once, when the second forward pass starts (the first token
    was sampled) or when the owner calls :meth:`finish_prefill` after a single-forward
    generation. At that moment every layer holds the prompt's KV.
    """

    def __init__(self, config, loader: LayerLoader | None, prefix_tokens: int,
                 timeline: LoadTimeline, on_prefill_done=None):
        super().__init__(config=config)
        self.loader = loader
        self.timeline = timeline
        self._on_prefill_done = on_prefill_done
        self._forwards = 0
        if loader is not None:
            self.layers = [_PrefixLayer(self, i, prefix_tokens) for i in range(len(self.layers))]

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if layer_idx == 0:
            self._forwards += 1
            if self._forwards == 2:
                self.finish_prefill()
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def finish_prefill(self) -> None:
        cb, self._on_prefill_done = self._on_prefill_done, None
        if cb is not None:
            cb(self)


def check_supported(config) -> None:
    """Raise ValueError unless every layer of this model caches plain full-attention KV."""
    probe = DynamicCache(config=config)
    kinds = {type(layer).__name__ for layer in probe.layers}
    if not probe.layers or kinds != {"DynamicLayer"}:
        raise ValueError(
            f"{type(config).__name__}: kvstore caches full-attention layers only; this model's "
            f"cache layers are {sorted(kinds) or 'unknown'} (sliding-window, linear-attention or "
            "hybrid caches are not supported)")


def sequence_pages(k: torch.Tensor, v: torch.Tensor, block_tokens: int, first_token: int,
                   n_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One cache layer's K and V ([1, H, seq, D]) as ``n_blocks`` pages of ``block_tokens``
    tokens from ``first_token`` on: [n_blocks, block_tokens, H, D] strided views (no copy)."""
    def pages(t: torch.Tensor) -> torch.Tensor:
        _, H, T, D = t.shape
        if first_token + n_blocks * block_tokens > T:
            raise ValueError(f"cache layer holds {T} tokens, fewer than the "
                             f"{first_token + n_blocks * block_tokens} to pack")
        _, s_h, s_t, s_d = t.stride()
        return t.as_strided((n_blocks, block_tokens, H, D), (block_tokens * s_t, s_t, s_h, s_d),
                            t.storage_offset() + first_token * s_t)
    return pages(k), pages(v)


def pack_blocks(layers: list[tuple[torch.Tensor, torch.Tensor]], layout: KVLayout,
                first_token: int, n_blocks: int) -> torch.Tensor:
    """[n_blocks, L, 2, B, H, D] from per-layer K/V [1, H, seq, D], tokens from first_token,
    on the cache's device."""
    B = layout.block_tokens
    pages = [sequence_pages(k, v, B, first_token, n_blocks) for k, v in layers]
    return gather(pages, torch.arange(n_blocks).view(-1, 1))
