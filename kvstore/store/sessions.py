"""Sessions, leases and allocations: who holds which blocks, and until when.

A *session* lives as long as its client's OpenSession stream. A *lease* pins blocks for a reader
(get); an *allocation* pins fresh slots for a writer (put). Both carry a deadline: a live client
that forgets to release cannot pin memory forever (the leak LMCache's pin counts had). When the
stream breaks, everything the session held is reclaimed at once.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field


@dataclass
class Lease:
    lease_id: int
    session_id: int
    block_ids: list[int]
    deadline: float
    hbm_fill: dict[int, int] = field(default_factory=dict)   # block id -> HBM slot to fill


@dataclass
class Allocation:
    allocation_id: int
    session_id: int
    ns: int
    block_ids: list[int]          # -1 where the key was already stored (nothing to write)
    deadline: float


@dataclass
class Session:
    session_id: int
    client_name: str
    pid: int
    opened_at: float = field(default_factory=time.monotonic)
    leases: dict[int, Lease] = field(default_factory=dict)
    allocations: dict[int, Allocation] = field(default_factory=dict)
    # Slots of allocations that expired while this client lived: it may still be writing into
    # them, so they are reused only once it cannot write any more (kvstore.store.writers).
    quarantined_slots: list[int] = field(default_factory=list)
    quarantined_hbm: list[int] = field(default_factory=list)   # HBM fill slots, likewise
    # The client's process, watched once it first wrote (allocate, an HBM fill); None: not
    # watched yet, or not watchable (``watched`` says whether it was tried)
    writer: object = None
    watched: bool = False


class IdSource:
    """Ids that are never 0 (0 means "none" on the wire) and never reused within a daemon."""

    def __init__(self):
        self._it = itertools.count(1)

    def __call__(self) -> int:
        return next(self._it)
