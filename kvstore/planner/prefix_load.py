"""Partial loading for engines whose computed tokens are always a prefix (vLLM).

kvstore.planner.recompute splits a cached prefix Cake's way: compute the front while the back
loads. vLLM cannot run that plan: the tokens an external cache provides are the front of the
prompt and the engine computes what follows. The same question then reads the other way round:
of the cached blocks after what the engine already holds, how many to load — the rest is
computed by the engine, like the uncached suffix.

Cost model (the prefill profile and tier bandwidths are kvstore.planner.recompute's):
- Load: blocks [0, j) of the hit come from their tiers one after another, after a fixed
  per-request latency:  load_s(j) = latency_s + Σ_{i < j} block_bytes / bandwidth(tier_i)
  (0 for j = 0: nothing is asked for).
- Compute: the engine then prefills tokens [c + j·B, N) on top of the c + j·B it holds
  (c: tokens the engine had already, B: block tokens, N: the prompt):
      compute_s(j) = f(N) − f(c + j·B),   f(t) = c1·t + c2·t²
  (the profile's quadratic term is attention over the positions before each token, so the
  difference is the marginal cost of the tokens computed; its fixed c0 is left out: the
  uncached suffix is computed under every plan, so each pays one forward's fixed cost).
- The load finishes before the forward that needs it starts (the connector's loads complete in
  get_finished, or before the forward of the step for a synchronous one), so the two add:
      ttft(j) = load_s(j) + compute_s(j)
  unless the load streams layer by layer (``overlap_layers`` = L layers: the connector's
  stream_slow_loads). The forward's layer l then waits only for layer l of the loaded blocks,
  so load and compute run as an L-stage pipeline, each stage 1/L of either:
      ttft(j) = max(load_s(j), compute_s(j)) + min(load_s(j), compute_s(j)) / L
  — at the crossover (load all = compute all) loading about half and computing the rest then
  takes about half of either extreme.
  The plan minimises it over j = 0..n (exhaustive: n is at most a few thousand blocks); j = n is
  "load everything", j = 0 "recompute everything", so the chosen plan is never predicted slower
  than either. Ties go to loading more: it leaves the engine's compute to other requests.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from kvstore.planner.recompute import PrefillProfile


@dataclass(frozen=True)
class PrefixLoad:
    load_blocks: int             # j: load blocks [0, j) of the hit, compute the rest
    predicted_s: float           # ttft(j) without the uncached suffix's share
    load_all_s: float            # ttft(n)
    recompute_all_s: float       # ttft(0)


def plan_prefix_load(block_tiers: Sequence[str], block_tokens: int, block_bytes: int,
                     tier_bandwidth_bps: dict[str, float], profile: PrefillProfile,
                     computed_tokens: int, prompt_tokens: int,
                     latency_s: float = 0.0, overlap_layers: int = 0) -> PrefixLoad:
    """How many leading blocks of a hit of len(block_tiers) blocks to load (module docstring).

    ``computed_tokens``: what the engine holds before the hit (the hit starts there);
    ``prompt_tokens``: the whole prompt, whose tokens past what is loaded are computed. A tier
    with unknown or zero bandwidth cannot load (its block and those after it are computed); an
    unmeasured profile loads everything it can (compute is never assumed free)."""
    n = len(block_tiers)
    if n == 0:
        return PrefixLoad(0, 0.0, 0.0, 0.0)
    load = [0.0] * (n + 1)          # load[j]: seconds to load blocks [0, j)
    for i, tier in enumerate(block_tiers):
        bw = tier_bandwidth_bps.get(tier, 0.0) or 0.0
        load[i + 1] = load[i] + (block_bytes / bw if bw > 0 else math.inf)
    load = [0.0] + [x + latency_s for x in load[1:]]

    def upto(t: int) -> float:   # the profile without c0: every plan runs one forward anyway
        return profile.c1 * t + profile.c2 * t * t

    def compute(j: int) -> float:
        return upto(prompt_tokens) - upto(computed_tokens + j * block_tokens)

    def ttft(j: int) -> float:
        ld, cp = load[j], compute(j)
        if overlap_layers > 0 and j > 0:
            return max(ld, cp) + min(ld, cp) / overlap_layers
        return ld + cp

    if not profile.measured:
        j = next((i for i in range(n, -1, -1) if not math.isinf(load[i])), 0)
        return PrefixLoad(j, load[j], load[n], math.inf if n else 0.0)
    best_j, best = 0, math.inf
    for j in range(n + 1):
        t = ttft(j)
        if not math.isinf(t) and t <= best + 1e-12:       # ties: the larger j (see the module docstring)
            best_j, best = j, t
    return PrefixLoad(best_j, best, ttft(n), compute(0))
