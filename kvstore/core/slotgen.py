"""Slot generations: a seqlock per arena slot, in a small shared-memory segment of its own.

The daemon bumps the generation of an arena slot every time the slot is handed to a new owner
(SlabAllocator.allocate: a put, a promotion) and for every slot of a span given back to the chunk
pool (the chunk may be cut into slots of another size). A slot's bytes change only after it was
handed out again, so a reader that saw generation g when its lease was granted (the Acquire
reply carries it) and still sees g after copying the bytes has copied exactly the block it was
granted — whether or not its lease was still valid by then (expired, session ended). A changed
generation proves nothing about the bytes: the copy of that block is discarded.

The table is one uint32 per 4 KiB page of the arena (slot offsets are 4 KiB aligned), indexed by
offset // 4096, so 1/1024 of the arena's size; it lives in its own file next to the arena
(``<arena>.slotgen``) rather than in the arena's data layout, and its header holds the arena's
UUID so that a client can tell that it belongs to the arena it mapped. Clients map it read-only.
The file itself is kvstore.core.shmfile's (0600, removed with its arena, orphans cleaned up).

Memory order: the daemon's bump is a store that precedes (in program order, then through a
socket) any write of the slot's next owner; the reader's check is a load after its copy's loads.
On x86-64 (TSO: loads are not reordered with older loads, stores are seen in causal order) that
is a correct seqlock without explicit fences; other architectures would need a load fence
before the check and a store fence after the bump, which Python cannot issue: there the SDK
does not use the table at all and confirms every read's release instead
(kvstore/core/memorder.py).

It also serves lease-free same-host reads (docs/decisions.md): the daemon publishes a block's
offset with its slot's generation in the index snapshot (kvstore/core/shmindex.py), and a client
that knows both reads the block without an Acquire/Release round trip, checking the generation
after its copy exactly as a leased read does.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from kvstore.core.shmfile import ShmFile, attach_companion, companion_path, create_companion

PAGE_BYTES = 4096
_MAGIC = b"KVSGEN01"
_DATA_OFFSET = 64


class SlotGenerationsError(RuntimeError):
    pass


def path_for(arena_path: str | Path) -> Path:
    return companion_path(arena_path, ".slotgen")


class SlotGenerations:
    """The generation table of one arena. :meth:`create` (daemon, writable) or :meth:`attach`
    (client, read-only)."""

    def __init__(self, file: ShmFile, entries: int):
        self.path = file.path
        self._file = file
        self.table = np.frombuffer(file.mm, dtype=np.uint32, count=entries, offset=_DATA_OFFSET)

    @classmethod
    def create(cls, arena_path: str | Path, arena_uuid: bytes,
               arena_bytes: int) -> "SlotGenerations":
        entries = -(-arena_bytes // PAGE_BYTES)
        file = create_companion(path_for(arena_path), _MAGIC, arena_uuid, entries,
                                _DATA_OFFSET + 4 * entries)
        return cls(file, entries)

    @classmethod
    def attach(cls, arena_path: str | Path, arena_uuid: bytes) -> "SlotGenerations":
        """Map the table of this arena read-only; SlotGenerationsError if it is not there or
        belongs to another arena."""
        file, entries = attach_companion(
            path_for(arena_path), SlotGenerationsError, "slot generations", _MAGIC, arena_uuid,
            _DATA_OFFSET, lambda n: _DATA_OFFSET + 4 * n)
        return cls(file, entries)

    # -- daemon -----------------------------------------------------------------------------
    def bump(self, offset: int) -> None:
        """The slot at ``offset`` gets a new owner: call before anyone may write it."""
        i = offset // PAGE_BYTES
        self.table[i] = (int(self.table[i]) + 1) & 0xFFFFFFFF

    def bump_many(self, offsets) -> None:
        idx = np.asarray(offsets, dtype=np.int64) // PAGE_BYTES
        self.table[idx] += np.uint32(1)    # wraps modulo 2**32, like bump

    # -- both -------------------------------------------------------------------------------
    def read(self, offsets) -> list[int]:
        """Generation of each slot; 0 for a negative offset (no DRAM slot)."""
        t = self.table
        return [int(t[o // PAGE_BYTES]) if o >= 0 else 0 for o in offsets]

    def at(self, offset: int) -> int:
        """Generation of the slot at ``offset`` (>= 0)."""
        return int(self.table[offset // PAGE_BYTES])

    def of(self, offsets: np.ndarray) -> np.ndarray:
        """Generation of each slot (uint32 array) of non-negative ``offsets`` (int64 array)."""
        return self.table[np.asarray(offsets, dtype=np.int64) // PAGE_BYTES]

    def valid_prefix(self, offsets, expected) -> int:
        """How many leading slots still have their expected generation (the seqlock check,
        after the copy). A slot with offset < 0 is not a DRAM read and passes."""
        t = self.table
        for i, (o, g) in enumerate(zip(offsets, expected)):
            if o >= 0 and int(t[o // PAGE_BYTES]) != g:
                return i
        return len(offsets)

    def close(self) -> None:
        self.table = None
        self._file.close()
