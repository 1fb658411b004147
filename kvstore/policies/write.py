"""Write policies: when a block committed to DRAM gets a copy in a tier below (SSD, remote).

    write_through            every committed block is written; the SSD tier answers the commit
                             once it is durable, the remote tier queues it in the background.
    write_back               (SSD only) written when DRAM evicts it — ahead of time by a
                             background cleaner, synchronously if the cleaner fell behind.
    write_through_selective  written once gets have read it ``write_hits`` times (SGLang
                             HiCache's policy of that name): a block nobody reads costs no write.

A tier asks its policy three questions; it never compares policy names itself:

    on_commit     write the freshly committed blocks now (and, for SSD, wait for durability)?
    on_eviction   write dirty DRAM victims before they are evicted (and keep victims clean in
                  the background)?
    due(hits)     which of the blocks a get just leased are due for a write (hit counts, numpy)?
"""
from __future__ import annotations

import numpy as np


class WritePolicy:
    """The protocol; the defaults write nothing."""

    name = ""
    on_commit = False
    on_eviction = False

    def due(self, hits: np.ndarray) -> np.ndarray:
        """Mask over ``hits`` (the leased blocks' hit counts): blocks to write after a get."""
        return np.zeros(len(hits), dtype=bool)


class WriteThrough(WritePolicy):
    name = "write_through"
    on_commit = True


class WriteBack(WritePolicy):
    name = "write_back"
    on_eviction = True


class WriteThroughSelective(WritePolicy):
    name = "write_through_selective"

    def __init__(self, write_hits: int = 1):
        self.write_hits = write_hits

    def due(self, hits: np.ndarray) -> np.ndarray:
        return np.asarray(hits) >= self.write_hits


WRITE_POLICIES = {p.name: p for p in (WriteThrough, WriteBack, WriteThroughSelective)}
SSD_WRITE_POLICIES = tuple(WRITE_POLICIES)
REMOTE_WRITE_POLICIES = ("write_through", "write_through_selective")


def normalize(name: str, allowed=SSD_WRITE_POLICIES) -> str:
    """The canonical name (case and '-' ignored); ValueError naming the choices otherwise."""
    s = str(name).lower().replace("-", "_")
    if s not in allowed:
        choices = ", ".join(allowed[:-1]) + f" or {allowed[-1]}" if len(allowed) > 1 else allowed[0]
        raise ValueError(f"must be {choices}, got {name!r}")
    return s


def write_policy(name: str, write_hits: int = 1, allowed=SSD_WRITE_POLICIES) -> WritePolicy:
    """The policy called ``name``; ValueError for a name not in ``allowed``."""
    cls = WRITE_POLICIES[normalize(name, allowed)]
    return cls(write_hits) if cls is WriteThroughSelective else cls()
