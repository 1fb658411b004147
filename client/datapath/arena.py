"""The shared DRAM arena data path: the daemon's arena mapped here, blocks moved by memcpy.

For a same-host client the daemon trusts with its arena (SessionEvent.arena). Writes go
straight into the allocated slots; reads copy out of the leased slots, and the slot
generations (kvstore/core/slotgen.py), read after the copy, prove it without a round trip: a
slot reused under the copy (its lease ended) fails the check, and that block and every later
one are discarded. Without a generation table only a confirmed release proves a read.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from kvstore.client import transfer
from kvstore.client.datapath.base import DataPath, Read
from kvstore.core import memorder
from kvstore.core.arena import Arena
from kvstore.core.slotgen import SlotGenerations, SlotGenerationsError

if TYPE_CHECKING:
    from kvstore.client.lease import BlockLease

log = logging.getLogger("kvstore.client")


class ArenaMapping:
    """The arena mapped in this process: the Arena, its byte views, its slot generations."""

    def __init__(self, grant):
        """``grant``: the session's ArenaInfo. Raises ArenaError if it cannot be mapped."""
        self.arena = Arena.attach(grant.path, grant.uuid, grant.size_bytes)
        self.view = transfer.ArenaView(self.arena.buffer, self.arena.populate,
                                       self.arena.mapped_bytes)
        self.view.follow(self.arena.populated_bytes)
        self.generations: SlotGenerations | None = None
        unsound = memorder.lock_free_reads_unsound()
        if unsound and grant.generations_path:
            # the generation check after a copy is a seqlock: sound only under TSO
            log.info("slot generations not used: %s", unsound)
        elif grant.generations_path:
            try:
                self.generations = SlotGenerations.attach(grant.path, grant.uuid)
            except (SlotGenerationsError, OSError) as exc:
                # Still correct, one round trip slower: every get confirms its release.
                log.info("no slot generations (%s): gets confirm their releases", exc)

    def close(self) -> None:
        if self.generations is not None:
            self.generations.close()
            self.generations = None
        self.view.close()            # its background populate, before the unmap
        self.arena.close()


class ArenaPath(DataPath):
    shared_memory = True

    def __init__(self, mapping: ArenaMapping, copy_pool=None):
        """``copy_pool``: threads that split one large host copy (None: copy on the caller)."""
        self.mapping = mapping
        self.arena_view = mapping.view
        self._copy_pool = copy_pool

    @property
    def arena(self):
        return self.mapping.arena

    @property
    def generations(self):
        return self.mapping.generations

    # -- the copies (PinnedPath overrides them for CUDA tensors) ---------------------------
    def copy_in(self, rows, offsets: list[int], indices: list[int], ready=None) -> None:
        """rows[i] -> slot offsets[i] for i in indices; done on return."""
        bb = rows.shape[1]
        av = self.arena_view
        av.prefault(offsets, indices, bb)
        transfer.copy_runs(rows, av.rows_for(rows), offsets, indices, bb, to_arena=True,
                           pool=self._copy_pool)

    def copy_out(self, dst, offsets: list[int], indices: list[int], ready=None) -> None:
        """slot offsets[i] -> dst[i] for i in indices; done on return."""
        if not indices:
            return
        bb = dst.shape[1]
        av = self.arena_view
        av.prefault(offsets, indices, bb)
        transfer.copy_runs(dst, av.rows_for(dst), offsets, indices, bb, to_arena=False,
                           pool=self._copy_pool)

    # -- the DataPath contract -------------------------------------------------------------
    def write(self, session_id: int, allocation_id: int, offsets: list[int], rows,
              ready=None) -> int:
        todo = [i for i, o in enumerate(offsets) if o >= 0]
        self.copy_in(rows, offsets, todo, ready)
        return len(todo)

    def read(self, lease: "BlockLease", dst, ready=None) -> Read:
        self.copy_out(dst, lease.offsets, list(range(len(lease))), ready)
        return self.proof(lease, unproven=len(lease))

    @staticmethod
    def proof(lease: "BlockLease", unproven: int) -> Read:
        """The seqlock check, after the copy: the generations prove a prefix of the blocks;
        without a generation table nothing is proven (a confirmed release must)."""
        proven = lease.valid_prefix()
        if proven is None:
            return Read(len(lease), 0)
        return Read(proven, unproven)

    def views(self, offsets: list[int], row_bytes: int, like: str = "torch") -> list:
        av = self.arena_view
        base = av.torch if like == "torch" else av.np
        av.prefault(offsets, range(len(offsets)), row_bytes)   # before the caller touches them
        return [base[o:o + row_bytes] if o >= 0 else None for o in offsets]

    def close(self) -> None:
        self.mapping.close()
