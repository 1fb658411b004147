"""Partial recomputation: how much of a cached prefix to recompute instead of loading.

Loading a cached prefix is not always faster than recomputing it: with a slow tier and a fast
accelerator the best plan recomputes the first k tokens while the remaining N − k are loaded
concurrently, with k chosen so that both finish together. This is Cake's bidirectional scheme
(Jin et al., "Compute Or Load KV Cache? Why Not Both?", ICML 2025: compute from the front, load
from the back, meet in the middle); KVPR (ACL Findings 2025) makes the same split but transfers
activations for the recomputed part. Here the split is on block boundaries.

Cost model
----------
- Compute: prefilling tokens [0, k) from nothing costs
      compute_s(k) = c0 + c1·k + c2·k²
  (c1: projections and MLP, linear in tokens; c2: attention, whose cost per token grows with its
  position — so later tokens are dearer). The client measures these on its own hardware
  (``PrefillProfile.fit``) — the daemon cannot know them.
- Load: blocks [j, n) come from their tiers one after another at each tier's measured read
  bandwidth, after a fixed per-request latency:
      load_s(j) = latency_s + Σ_{i ≥ j} block_bytes / bandwidth(tier_i)     (0 if j = n)
- The two run concurrently, so the prefix is ready after max(compute_s(j·B), load_s(j)); the
  uncached suffix costs the same under every plan and does not enter the choice.

The plan minimises that maximum over j = 0..n (exhaustive: n is at most a few thousand blocks).
k = 0 is "load everything", k = N is "recompute everything". By construction the chosen plan is
never predicted slower than either extreme; the client adapts at run time if the load turns out
slower than predicted (it keeps computing past k and drops the blocks it no longer needs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class PrefillProfile:
    """Seconds to prefill k tokens from an empty cache: c0 + c1·k + c2·k²."""

    c0: float = 0.0
    c1: float = 0.0
    c2: float = 0.0

    def seconds(self, tokens: int) -> float:
        if tokens <= 0:
            return 0.0
        return self.c0 + self.c1 * tokens + self.c2 * tokens * tokens

    @property
    def measured(self) -> bool:
        return self.c1 > 0 or self.c2 > 0

    @classmethod
    def fit(cls, samples: Sequence[tuple[int, float]]) -> "PrefillProfile":
        """Least-squares fit of (tokens, seconds) samples; coefficients clamped at >= 0."""
        import numpy as np

        pts = [(t, s) for t, s in samples if t > 0 and s >= 0]
        if not pts:
            raise ValueError("no (tokens, seconds) samples to fit")
        t = np.array([p[0] for p in pts], dtype=float)
        s = np.array([p[1] for p in pts], dtype=float)
        if len(set(t.tolist())) < 3:
            return cls(0.0, float(np.sum(s) / np.sum(t)), 0.0)  # too few points: linear only
        a = np.stack([np.ones_like(t), t, t * t], axis=1)
        c, *_ = np.linalg.lstsq(a, s, rcond=None)
        c = np.maximum(c, 0.0)
        return cls(float(c[0]), float(c[1]), float(c[2]))


@dataclass(frozen=True)
class Plan:
    recompute_tokens: int        # k: recompute tokens [0, k)
    load_blocks_from: int        # first block to load (k // block_tokens)
    predicted_s: float           # max(compute, load) for the chosen split
    load_all_s: float            # predicted time of k = 0
    recompute_all_s: float       # predicted time of k = N
    compute_s: float
    load_s: float
    num_cached: int = 0                  # filled in by the daemon's PlanRecompute answer
    tiers: tuple = ()
    bandwidth_bps: dict | None = None

    @property
    def speedup_vs_best_extreme(self) -> float:
        best = min(self.load_all_s, self.recompute_all_s)
        return best / self.predicted_s if self.predicted_s > 0 else 1.0


def plan_recompute(block_tiers: Sequence[str], block_tokens: int, block_bytes: int,
                   tier_bandwidth_bps: dict[str, float], profile: PrefillProfile,
                   latency_s: float = 0.0) -> Plan:
    """Choose k for a cached prefix of len(block_tiers) blocks (see the module docstring).

    A tier with unknown or zero bandwidth is treated as infinitely slow (recompute what it
    holds); an unmeasured profile (all zeros) means recompute is assumed free only if no load
    is possible at all — otherwise loading everything is the safe answer.
    """
    n = len(block_tiers)
    if n == 0:
        return Plan(0, 0, 0.0, 0.0, 0.0, 0.0, 0.0)
    per_block = []
    for tier in block_tiers:
        bw = tier_bandwidth_bps.get(tier, 0.0) or 0.0
        per_block.append(block_bytes / bw if bw > 0 else math.inf)
    # suffix sums: load_s(j) for j = 0..n
    load = [0.0] * (n + 1)
    for j in range(n - 1, -1, -1):
        load[j] = load[j + 1] + per_block[j]
    load = [x + latency_s if j < n else 0.0 for j, x in enumerate(load)]
    if not profile.measured:
        if math.isinf(load[0]):
            # cannot load and do not know compute cost: recompute is the only way
            return Plan(n * block_tokens, n, math.inf, load[0], math.inf, math.inf, 0.0)
        return Plan(0, 0, load[0], load[0], math.inf, 0.0, load[0])
    best_j, best = 0, math.inf
    for j in range(n + 1):
        t = max(profile.seconds(j * block_tokens), load[j])
        if t < best - 1e-12:
            best_j, best = j, t
    k = best_j * block_tokens
    return Plan(k, best_j, best, load[0], profile.seconds(n * block_tokens),
                profile.seconds(k), load[best_j])
