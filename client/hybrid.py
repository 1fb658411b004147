"""Hybrid prefill for transformers models: recompute the front of a cached prefix while the
back loads, then run the uncached suffix (Cake, ICML 2025: compute from the front, load from
the back, meet in the middle).

    from kvstore.client.hybrid import HybridPrefill
    hp = HybridPrefill(model, ns, profile)            # profile: kvstore.planner.recompute.PrefillProfile
    cache, report = hp.prefix_cache(input_ids)        # a DynamicCache holding the cached prefix
    out = model.generate(input_ids, past_key_values=cache, ...)   # computes only the rest

(``HFPrefixCache.generate_hybrid`` does this with the adapter's fallbacks and stores.)

Protocol of one request:
1. The daemon's planner (``Namespace.plan_recompute``) gets the prompt's usable cached blocks
   [0, N) (the last prompt token is always computed) and answers k: recompute tokens [0, k),
   load blocks [k/B, N). k = N·B: recompute all, nothing is loaded.
2. A loader thread fetches blocks from the back, ``load_chunk_blocks`` per get, down to k/B
   (never below what compute has already done). The main thread meanwhile prefills [0, k) in
   one forward pass.
3. Dynamic meeting point: if the loader has not reached k/B when compute finishes, compute
   goes on in ``chunk_tokens`` steps until it meets the loaded range; a chunk that turned out
   unneeded (compute passed it while it loaded) is dropped. A failed or short load (miss,
   error, timeout) stops the loader; compute covers the rest. So a slow tier can never make the
   prefix slower than recomputing it (plus one chunk), and a wrong plan costs at most one chunk.
4. The loaded blocks are appended to the computed KV; the cache then holds [0, N·B).

Exactness: loaded KV is the bytes an earlier prefill of the same model and tokens produced;
recomputed KV is computed from the same tokens at the same positions. Outputs equal a full
recompute up to float reassociation from different chunk shapes (the adapter's tolerance, see
tests/client/test_hf_exact.py; greedy tokens equal).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicCache

from kvstore.planner.recompute import PrefillProfile

log = logging.getLogger("kvstore.client.hybrid")


@dataclass
class HybridReport:
    cached_blocks: int = 0           # N: usable cached blocks (tokens [0, N·B))
    planned_tokens: int = 0          # k from the planner
    computed_tokens: int = 0         # where compute met the loaded range (>= k if load lagged)
    loaded_blocks: int = 0           # blocks taken from the load (after the meeting point)
    dropped_blocks: int = 0          # loaded but not needed (compute got there first)
    load_failed: str = ""
    plan: object = None
    load_s: float = 0.0
    compute_s: float = 0.0
    events: list = field(default_factory=list)


class HybridPrefill:
    def __init__(self, model, namespace, profile: PrefillProfile, *, chunk_tokens: int = 256,
                 load_chunk_blocks: int = 8, latency_s: float = 0.0, timeout_s: float = 120.0):
        self.model = model
        self.ns = namespace
        self.profile = profile
        self.B = namespace.layout.block_tokens
        if chunk_tokens % self.B:
            raise ValueError(f"chunk_tokens {chunk_tokens} must be a multiple of the block size "
                             f"{self.B}")
        self.chunk_tokens = chunk_tokens
        self.load_chunk_blocks = load_chunk_blocks
        self.latency_s = latency_s
        self.timeout_s = timeout_s

    def prefix_cache(self, input_ids: torch.Tensor, plan=None,
                     keys: list[bytes] | None = None) -> tuple[DynamicCache, HybridReport]:
        """A DynamicCache with the prompt's cached prefix in it (computed or loaded).

        ``plan`` overrides the daemon's (tests, benchmarks: force k)."""
        ids = torch.as_tensor(input_ids).reshape(1, -1)
        n = ids.shape[1]
        B = self.B
        keys = keys if keys is not None else self.ns.block_keys(ids[0].tolist())
        usable = keys[:min(len(keys), (n - 1) // B, self.ns.client.max_batch_blocks)]
        rep = HybridReport()
        if plan is None:
            plan = self.ns.plan_recompute(usable, self.profile, self.latency_s) if usable else None
        rep.plan = plan
        N = min(plan.num_cached, len(usable)) if plan is not None else 0
        cache = DynamicCache(config=self.model.config)
        rep.cached_blocks = N
        if N == 0:
            return cache, rep
        k = min(plan.recompute_tokens, N * B) // B * B
        rep.planned_tokens = k
        if k >= N * B:                        # recompute all: nothing to load
            self._forward(ids, 0, N * B, cache)
            rep.computed_tokens = N * B
            return cache, rep
        return self._meet(ids, usable[:N], N, k, cache, rep)

    # -- compute and load, side by side --------------------------------------------------------
    def _meet(self, ids, keys, N, k, cache, rep):
        B = self.B
        lock = threading.Lock()
        state = {"loaded_from": N, "computed": 0, "failed": "", "loaded": 0}
        cond = threading.Condition()
        plan_bw = (rep.plan.bandwidth_bps or {}).get("SSD", 0.0) if rep.plan else 0.0
        self._planned_block_s = self.ns.layout.block_bytes / plan_bw if plan_bw else 0.0
        chunks: list[tuple[int, int, torch.Tensor]] = []   # (first block, n, kv) back to front
        t0 = time.perf_counter()

        def load():
            hi = N
            try:
                while True:
                    with lock:
                        floor = max(k // B, -(-state["computed"] // B))
                    if hi <= floor:
                        return
                    lo = max(floor, hi - self.load_chunk_blocks)
                    kv = self.ns.get(keys[lo:hi]).result(timeout=self.timeout_s)
                    if len(kv) < hi - lo:
                        with lock:
                            state["failed"] = f"miss: {len(kv)} of blocks [{lo}, {hi}) found"
                        return
                    with lock:
                        chunks.append((lo, hi - lo, kv))
                        state["loaded_from"] = lo
                        state["loaded"] += hi - lo
                    with cond:
                        cond.notify_all()
                    rep.events.append(("loaded", lo, time.perf_counter() - t0))
                    hi = lo
            except Exception as exc:  # noqa: BLE001 - a failed load means more compute
                with lock:
                    state["failed"] = f"{type(exc).__name__}: {exc}"
            finally:
                rep.load_s = time.perf_counter() - t0

        loader = threading.Thread(target=load, name="kvstore-hybrid-load", daemon=True)
        loader.start()
        m = 0
        if k:
            self._forward(ids, 0, k, cache)
            m = k
            rep.events.append(("computed", m, time.perf_counter() - t0))
        while True:
            with lock:
                state["computed"] = m
                target = state["loaded_from"] * B
                failed = state["failed"]
            if m >= target:
                break
            if failed or not loader.is_alive():
                # The loader stopped short: compute up to what it delivered.
                self._forward(ids, m, target, cache)
                m = target
                continue
            step = min(self.chunk_tokens, target - m)
            chunk_s = self.profile.seconds(m + step) - self.profile.seconds(m)
            if self._load_reaches_s(state, lock, m, N, t0) < chunk_s:
                # The load will cover [m, target) before this chunk would be computed: let it.
                with cond:
                    cond.wait(timeout=0.005)
                continue
            self._forward(ids, m, m + step, cache)
            m += step
            rep.events.append(("computed", m, time.perf_counter() - t0))
        rep.compute_s = time.perf_counter() - t0
        with lock:
            state["computed"] = m            # the loader stops at its next check
        # Every chunk at or after the meeting point is already in ``chunks`` (loaded_from
        # moves only after a chunk is appended); one still in flight is not needed and ends
        # on its own (its lease is released by get).
        with lock:
            have = sorted(chunks)            # front to back
            rep.load_failed = state["failed"]
        first = m // B
        parts, got = [], 0
        for lo, cnt, kv in have:
            if lo + cnt <= first:
                rep.dropped_blocks += cnt
                continue
            skip = max(0, first - lo)
            rep.dropped_blocks += skip
            parts.append(kv[skip:])
            got += cnt - skip
        if first + got != N:                 # cannot happen with a contiguous load; be safe
            raise RuntimeError(f"hybrid prefill: computed {first} + loaded {got} blocks != {N}")
        if parts:
            self._append(cache, torch.cat(parts) if len(parts) > 1 else parts[0])
        rep.computed_tokens = m
        rep.loaded_blocks = got
        return cache, rep

    def _load_reaches_s(self, state, lock, m: int, N: int, t0: float) -> float:
        """Predicted seconds until the load covers down to token m: the observed per-block
        rate so far (the plan's bandwidth until a chunk has landed, or the time already spent
        on the first chunk if that is longer). Compute continues past k only when this
        exceeds the next chunk's compute time: Cake's meeting point, moved by what the load
        actually does."""
        with lock:
            loaded, lf = state["loaded"], state["loaded_from"]
        elapsed = time.perf_counter() - t0
        if loaded:
            per_block = elapsed / loaded
        else:
            per_block = max(self._planned_block_s, elapsed / self.load_chunk_blocks)
        if not per_block:
            return float("inf")
        return max(0, lf - m // self.B) * per_block

    def _forward(self, ids, start: int, end: int, cache) -> None:
        if end <= start:
            return
        with torch.no_grad():
            self.model(input_ids=ids[:, start:end].to(self.model.device), past_key_values=cache,
                       use_cache=True, logits_to_keep=1)

    def _append(self, cache: DynamicCache, kv: torch.Tensor) -> None:
        """Append blocks [n, L, 2, B, H, D] to every layer of the cache."""
        lay = self.ns.layout
        n = kv.shape[0]
        dev = self.model.device
        for layer in range(lay.num_layers):
            # [n, B, H, D] -> [1, H, n*B, D]
            k = kv[:, layer, 0].reshape(n * lay.block_tokens, lay.num_kv_heads, lay.head_dim)
            v = kv[:, layer, 1].reshape(n * lay.block_tokens, lay.num_kv_heads, lay.head_dim)
            cache.update(k.permute(1, 0, 2).unsqueeze(0).to(dev),
                         v.permute(1, 0, 2).unsqueeze(0).to(dev), layer)
