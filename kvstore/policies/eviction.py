"""Eviction policies: which blocks a full tier gives up first.

A policy orders candidates (block ids a tier may evict: committed, unpinned) most-evictable
first, reading the block table's columns; the tier takes as many from the front as it needs.
DRAM and HBM (kvstore.tiers.dram.make_room) and SSD (kvstore.tiers.ssd.space) use the same one,
chosen by the composition root (``eviction_policy(name)``).

    lru_prefix   least recently touched first; among blocks touched at the same time (one
                 request's chain), leaves before the blocks they hang from, deeper before
                 shallower: roots shared by many prefixes are worth the most.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np


class EvictionPolicy(Protocol):
    name: str

    def order(self, table, candidates: np.ndarray) -> np.ndarray:
        """``candidates`` (block ids) sorted most-evictable first."""
        ...


class PrefixAwareLRU:
    name = "lru_prefix"

    def order(self, table, candidates: np.ndarray) -> np.ndarray:
        if len(candidates) == 0:
            return candidates
        order = np.lexsort((
            -table.depth[candidates].astype(np.int64),
            table.children[candidates] > 0,
            table.stamp[candidates],
        ))
        return candidates[order]


EVICTION_POLICIES = {p.name: p for p in (PrefixAwareLRU,)}
DEFAULT_EVICTION = PrefixAwareLRU.name


def eviction_policy(name: str = DEFAULT_EVICTION) -> EvictionPolicy:
    """The policy called ``name``; ValueError naming the choices otherwise."""
    cls = EVICTION_POLICIES.get(str(name).lower().replace("-", "_"))
    if cls is None:
        raise ValueError(f"must be one of {', '.join(EVICTION_POLICIES)}, got {name!r}")
    return cls()
