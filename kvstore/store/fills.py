"""The slots a remote fill lands in, and the committed blocks the remote writer sends, over the
BlockStore's public methods: kvstore.tiers.remote.slots.FillSlots, which the composition root
hands the remote tier instead of the store.

A fill is a put of the daemon's own, in a session of the fill's own: open_fill opens the
session, makes room the way the Allocate RPC does (clean_room_for, then allocate: write-back
victims reach SSD before the eviction, awaited off the event loop), publish is a commit that
keeps only the verified blocks, close ends the session with ``writes_ended`` — the engine call
that wrote into the slots has returned, so whatever is still held comes back at once.
"""
from __future__ import annotations

import os
from typing import Sequence

from kvstore.core.errors import KVStoreError
from kvstore.core.keys import pack_keys
from kvstore.store.blockstore import BlockStore
from kvstore.tiers.base import COMMITTED, NO_SLOT
from kvstore.tiers.remote.slots import BlockRef, SlotNamespace


class StoreFill:
    """One open fill (kvstore.tiers.remote.slots.Fill): an allocation in its own session."""

    def __init__(self, store: BlockStore, session_id: int, allocation_id: int,
                 offsets: list[int]):
        self._store = store
        self._session_id = session_id
        self._allocation_id = allocation_id
        self.offsets = offsets
        self._open = True        # the allocation (publish or abort ends it)
        self._closed = False     # the session

    def publish(self, keep: Sequence[bool]) -> list[int]:
        """Commit the written blocks whose ``keep`` is True (one flag per offset >= 0, in
        order), drop the others unpublished. Returns the committed block ids ([] when the
        allocation ended meanwhile: expired, or the daemon is stopping)."""
        if not any(keep):
            self.abort()
            return []
        committed: list[int] = []
        self._open = False
        try:
            self._store.commit(self._session_id, self._allocation_id, keep=list(keep),
                               committed_out=committed)
        except KVStoreError:
            return []
        return committed

    def abort(self) -> None:
        if not self._open:
            return
        self._open = False
        try:
            self._store.commit(self._session_id, self._allocation_id, abort=True)
        except KVStoreError:
            pass        # expired already: its slots went with it

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._store.close_session(self._session_id, writes_ended=True)


class StoreFillSlots:
    """kvstore.tiers.remote.slots.FillSlots over ``store``."""

    def __init__(self, store: BlockStore):
        self._store = store
        self.arena = store.dram.buffer

    def prefix(self, namespace_id: bytes,
               keys_blob: bytes) -> tuple[SlotNamespace, list[bytes], int]:
        ns, keys, n = self._store.cached_prefix(namespace_id, keys_blob)
        return SlotNamespace(ns.namespace_id, ns.layout.block_bytes), keys, n

    async def open_fill(self, ns: SlotNamespace, keys: list[bytes],
                        parent_key: bytes) -> StoreFill:
        store = self._store
        blob = pack_keys(keys)
        sid = store.open_session("remote-fill", os.getpid()).session_id
        try:
            await store.clean_room_for(sid, ns.namespace_id, blob)
            alloc_id, offsets = store.allocate(sid, ns.namespace_id, blob, parent_key=parent_key)
        except BaseException:
            store.close_session(sid, writes_ended=True)
            raise
        return StoreFill(store, sid, alloc_id, offsets)

    async def persist(self, bids: list[int]) -> None:
        ssd = self._store.ssd
        if ssd is not None and bids:
            await ssd.persist(bids)

    def pin(self, bids: list[int]) -> None:
        self._store.table.pin(bids)

    def unpin(self, bids: list[int]) -> None:
        self._store.table.unpin(bids)

    def refs(self, bids: list[int]) -> list[BlockRef | None]:
        table = self._store.table
        out: list[BlockRef | None] = []
        for b in bids:
            if b < 0 or table.state[b] != COMMITTED or table.dram[b] == NO_SLOT:
                out.append(None)
                continue
            ns = table.namespace_of(b)
            out.append(BlockRef(ns.namespace_id, table.key_of(b), int(table.dram[b]),
                                ns.layout.block_bytes))
        return out

    def hits(self, bids: list[int]):
        return self._store.table.hits[bids]

    def find(self, namespace_id: bytes,
             keys_blob: bytes) -> tuple[SlotNamespace, list[bytes], list[int]]:
        store = self._store
        ns = store.namespace(namespace_id)
        keys = store.parse_keys(keys_blob)
        bids = store.table.find_many(ns.index, keys).tolist() if keys else []
        return SlotNamespace(ns.namespace_id, ns.layout.block_bytes), keys, bids
