"""What the remote tier may do with the daemon's blocks: the narrow interface it is handed.

The remote tier never holds the store. The composition root (kvstore.daemon.server) hands it
a :class:`FillSlots` (implemented over the store's public methods by
kvstore.store.fills.StoreFillSlots), which offers exactly what a fill and the write queue need.

A fill, in call order:

    prefix(ns_id, keys_blob)   -> (SlotNamespace, keys, n): the first n keys are local
    await open_fill(ns, keys, parent_key) -> Fill: fresh DRAM slots for the keys not stored
                               (invisible placeholders: concurrent puts and fills skip them);
                               room is made as for any put (write-back victims are written to
                               SSD before, awaited off the event loop); raises KVStoreError
                               (e.g. ResourceExhausted: every slot leased) — a miss
    fill.offsets[i]            >= 0: the engine writes block i at arena[offset:offset+bytes];
                               < 0: already stored or no room, not this fill's to write
    fill.publish(keep)         -> committed block ids: the blocks with keep True become
                               readable DRAM blocks in one step; the others are dropped
                               unpublished (never visible, not even to the index snapshot)
    fill.abort()               drop every block unpublished
    fill.close()               the fill's writes have ended (its engine call returned): any
                               slot of it still held is freed; always called, exactly once
    await persist(committed)   the SSD write policy for the published blocks

The write queue reads committed blocks in place:

    pin(bids) / unpin(bids)    the blocks' DRAM slots hold their bytes until unpinned
    refs(bids)                 -> [BlockRef | None]: a committed block held in DRAM, or None
    hits(bids)                 -> read counts (the selective write policy)
    find(ns_id, keys_blob)     -> (SlotNamespace, keys, block ids (-1: not stored)); raises
                               KVStoreError for an unknown namespace or malformed keys

``arena`` is the DRAM arena's buffer: the engine reads into it and writes from it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence


@dataclass(frozen=True)
class SlotNamespace:
    """A namespace as the remote tier sees it: its digest and its block size."""
    namespace_id: bytes
    block_bytes: int


@dataclass(frozen=True)
class BlockRef:
    """A committed block held in a DRAM slot (arena[offset:offset+block_bytes])."""
    namespace_id: bytes
    key: bytes
    offset: int
    block_bytes: int


class Fill(Protocol):
    offsets: list[int]

    def publish(self, keep: Sequence[bool]) -> list[int]: ...

    def abort(self) -> None: ...

    def close(self) -> None: ...


class FillSlots(Protocol):
    arena: memoryview

    def prefix(self, namespace_id: bytes,
               keys_blob: bytes) -> tuple[SlotNamespace, list[bytes], int]: ...

    async def open_fill(self, ns: SlotNamespace, keys: list[bytes],
                        parent_key: bytes) -> Fill: ...

    async def persist(self, bids: list[int]) -> None: ...

    def pin(self, bids: list[int]) -> None: ...

    def unpin(self, bids: list[int]) -> None: ...

    def refs(self, bids: list[int]) -> list[BlockRef | None]: ...

    def hits(self, bids: list[int]) -> Sequence[int]: ...

    def find(self, namespace_id: bytes,
             keys_blob: bytes) -> tuple[SlotNamespace, list[bytes], list[int]]: ...
