"""The contract every data path keeps (see the package docstring for the media).

A put: the daemon allocated slots (``offsets[i]``, -1 for a block it already holds); the
Namespace calls ``write`` and then commits: ``write`` returns only once every byte is in place
(a DMA has finished), so a committed block is whole.

A get: the daemon leased the longest stored prefix (a BlockLease: slot offsets, their
generations, the HBM slots to read or fill); the Namespace calls ``read`` while the lease holds
and then releases it. ``read`` returns only once every copy has finished (a slot is never reused
under a DMA) and says what the copy proves (:class:`Read`): the Namespace confirms the release
with the daemon exactly when a proof is missing, and keeps the proven prefix.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvstore.core.errors import InvalidArgument

if TYPE_CHECKING:
    from kvstore.client.lease import BlockLease


@dataclass(frozen=True)
class Read:
    """What a read of n leased blocks into ``dst`` established.

    valid:    rows [0, valid) of dst hold the leased bytes unless a proof below is missing.
    unproven: rows [unproven, valid) are proven only by a release the daemon confirms
              (unproven >= valid: nothing to confirm).
    fills:    indices of rows also written into HBM fill slots (the release publishes them).
    """
    valid: int
    unproven: int
    fills: list[int] = field(default_factory=list)


class DataPath(ABC):
    """One medium between this process and the daemon's blocks."""

    #: blocks live in this process's address space: zero-copy views, local index lookups
    shared_memory: bool = False
    # What the path holds, None where it holds no such thing (introspection: tests, benches)
    arena = None           # the mapped kvstore.core.arena.Arena
    generations = None     # the daemon's slot generations (kvstore/core/slotgen.py)
    arena_view = None      # the mapped arena (client/transfer.py ArenaView)
    pinned = None          # its pinned registration (client/cuda.py PinnedArena)
    pool = None            # the daemon's HBM pool opened here (client/hbm.py PoolView)

    def wants_hbm(self, out) -> bool:
        """Ask the daemon for HBM copies (and fill slots) for a get into ``out``."""
        return False

    @abstractmethod
    def write(self, session_id: int, allocation_id: int, offsets: list[int], rows,
              ready=None) -> int:
        """Write rows[i] ([n, block_bytes] uint8) into the allocated slot of each block with
        offsets[i] >= 0, after ``ready`` (a CUDA event, or None). Returns the number written."""

    @abstractmethod
    def read(self, lease: "BlockLease", dst, ready=None) -> Read:
        """Copy the lease's blocks (at least one) into dst ([n, block_bytes] uint8 rows) after
        ``ready``; returns what the copy proves."""

    def views(self, offsets: list[int], row_bytes: int, like: str = "torch") -> list:
        """Byte rows aliasing the slots at ``offsets`` (None where an offset is -1)."""
        raise InvalidArgument("zero-copy views need the shared arena (same host)")

    def close(self) -> None:
        """Release what the path holds (mappings, registrations); in-flight copies finish."""
